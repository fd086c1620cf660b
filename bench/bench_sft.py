"""SFT tokens/s: our `run_sft` vs TRL 1.16 `SFTTrainer` (shared script trl_sft.py), same model/data/LoRA/seq/batch.

Work: the 256 peer examples "Question: ...\\n\\nAnswer: <chosen>" (+EOS), LoRA r16/alpha32/dropout0.05 on
q_proj,v_proj, sequence length 512, batch 4, constant lr 1e-4, fp32, no gradient checkpointing, 2 threads.
Ours packs into dense 4x512 blocks; the TRL denominator is the BEST of the TRL configurations of the same work:
  packed bfd (TRL default, padding-free), packed wrapped (dense 4x512 = exactly our layout), unpacked (batch 4
  padded, twice the steps), and TRL's out-of-the-box bf16 autocast + gradient checkpointing (bfd) -- plus bf16
  autocast on the wrapped layout without checkpointing (the fastest TRL setting on a CPU with AVX512_BF16).
tokens/s counts non-pad input tokens per second (steady state: first step excluded), on both sides.

    python bench/bench_sft.py [--quick] [--variants all|default]   (or via run_all.py --only sft)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

STAGE = "sft"
GOAL = 1.3


def plan(ctx: bl.Ctx) -> list[dict]:
    steps = ctx.steps(8, 3)
    common = [
        "--steps",
        steps,
        "--seq-len",
        512,
        "--batch",
        4,
        "--lr",
        1e-4,
        "--lora-r",
        16,
        "--lora-alpha",
        32,
        "--lora-dropout",
        0.05,
        "--lora-targets",
        "q_proj,v_proj",
    ]
    sides = [
        bl.trl_side(
            ctx,
            "trl_sft_packed_wrapped",
            "trl_sft.py",
            [*common, "--packing-strategy", "wrapped"],
            config="packed wrapped (dense 4x512), fp32",
        )
    ]
    if ctx.variants == "all":
        sides += [
            bl.trl_side(ctx, "trl_sft_packed_bfd", "trl_sft.py", common, config="packed bfd (TRL default), fp32"),
            bl.trl_side(
                ctx,
                "trl_sft_unpacked",
                "trl_sft.py",
                [*common[:1], steps * 2, *common[2:], "--packing", 0],
                config="unpacked, fp32",
            ),
            bl.trl_side(
                ctx,
                "trl_sft_bfd_bf16_ckpt",
                "trl_sft.py",
                [*common, "--bf16", 1, "--grad-ckpt", 1],
                config="packed bfd, bf16 autocast + grad-ckpt (TRL defaults)",
            ),
            bl.trl_side(
                ctx,
                "trl_sft_wrapped_bf16",
                "trl_sft.py",
                [*common, "--packing-strategy", "wrapped", "--bf16", 1],
                config="packed wrapped, bf16 autocast",
            ),
            bl.trl_side(
                ctx,
                "trl_sft_unpacked_bf16",
                "trl_sft.py",
                [*common[:1], steps * 2, *common[2:], "--packing", 0, "--bf16", 1],
                config="unpacked, bf16 autocast",
            ),
            bl.trl_side(
                ctx,
                "trl_sft_wrapped_bf16_eager",
                "trl_sft.py",
                [*common, "--packing-strategy", "wrapped", "--bf16", 1],
                attention="eager",
                config="packed wrapped, bf16 autocast, eager attention",
            ),
        ]
    want = {
        "max_steps": steps,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_seq_length|seq_length|max_length|block_size": 512,
        "packing": True,
        # ~all 256 rows trained, like TRL: 1 question held out (eval_fraction 0 crashes run_sft on an empty eval
        # list at the time of writing); the held-out eval runs outside the timed steps anyway
        "eval_fraction": 0.001,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False,
        "precision": "fp32",
        "save_steps": 100000,
    }
    sides.append(
        bl.ours_side(ctx, "ours_sft", STAGE, want, config="run_sft, packed dense 4x512, fp32", layout="packed")
    )
    bf16 = bl.bf16_knob(STAGE)
    if bf16:  # our CPU recipe setting: bf16 frozen base + bf16 autocast, LoRA in fp32
        sides.append(
            bl.ours_side(
                ctx,
                "ours_sft_bf16",
                STAGE,
                {**want, **bf16},
                config="run_sft, packed dense 4x512, bf16 base + autocast",
                layout="packed",
            )
        )
    if ctx.variants == "all":  # our padded mode, against TRL's unpacked run (same steps)
        sides.append(
            bl.ours_side(
                ctx,
                "ours_sft_unpacked",
                STAGE,
                {**want, "packing": False, "max_steps": steps * 2},
                config="run_sft, unpacked (padded batches of 4), fp32",
                layout="unpacked",
            )
        )
    return sides


def rows(results: list[dict], ctx: bl.Ctx) -> list[dict]:
    ours = [r for r in results if r["role"] == "ours"]
    for r in ours:
        r["tokens_per_s"] = bl.metric(r, "tokens_per_s", STAGE)
    trl = [r for r in results if r["role"] == "trl"]
    bo, bt = bl.best(ours, "tokens_per_s"), bl.best(trl, "tokens_per_s")
    o, t = (bo or {}).get("tokens_per_s"), (bt or {}).get("tokens_per_s")
    out = [
        {
            "stage": "SFT",
            "metric": f"tokens/s, best vs best ({bo['name'] if bo else '-'})",
            "ours": o,
            "trl": t,
            "trl_side": bt["name"] if bt else "-",
            "ratio": bl.ratio(o, t),
            "goal": GOAL,
            "ours_rss": bl.rss(bo),
            "trl_rss": bl.rss(bt),
        }
    ]
    # same layout: our packed blocks vs TRL's packed runs, our padded batches vs TRL's unpacked run
    for r in trl:
        layout = "unpacked" if "unpacked" in r["name"] else "packed"
        mine = bl.best([x for x in ours if x.get("layout") == layout], "tokens_per_s")
        if mine is None:
            continue
        out.append(
            {
                "stage": "SFT",
                "metric": f"tokens/s, {mine['name']} vs {r['name']}",
                "ours": mine["tokens_per_s"],
                "trl": r.get("tokens_per_s"),
                "trl_side": r["name"],
                "ratio": bl.ratio(mine["tokens_per_s"], r.get("tokens_per_s")),
                "ours_rss": bl.rss(mine),
                "trl_rss": bl.rss(r),
            }
        )
    return out


if __name__ == "__main__":
    import run_all

    run_all.main(["--only", STAGE, *sys.argv[1:]])
