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
    common = ["--steps", steps, "--seq-len", 512, "--batch", 4, "--lr", 1e-4, "--lora-r", 16, "--lora-alpha", 32,
              "--lora-dropout", 0.05, "--lora-targets", "q_proj,v_proj"]
    sides = [bl.trl_side(ctx, "trl_sft_packed_wrapped", "trl_sft.py", [*common, "--packing-strategy", "wrapped"],
                         config="packed wrapped (dense 4x512), fp32")]
    if ctx.variants == "all":
        sides += [
            bl.trl_side(ctx, "trl_sft_packed_bfd", "trl_sft.py", common, config="packed bfd (TRL default), fp32"),
            bl.trl_side(ctx, "trl_sft_unpacked", "trl_sft.py",
                        [*common[:1], steps * 2, *common[2:], "--packing", 0], config="unpacked, fp32"),
            bl.trl_side(ctx, "trl_sft_bfd_bf16_ckpt", "trl_sft.py", [*common, "--bf16", 1, "--grad-ckpt", 1],
                        config="packed bfd, bf16 autocast + grad-ckpt (TRL defaults)"),
            bl.trl_side(ctx, "trl_sft_wrapped_bf16", "trl_sft.py",
                        [*common, "--packing-strategy", "wrapped", "--bf16", 1],
                        config="packed wrapped, bf16 autocast"),
        ]
    want = {
        "max_steps": steps, "batch_size": 4, "gradient_accumulation_steps": 1,
        "max_seq_length|seq_length|max_length|block_size": 512, "packing": True,
        # ~all 256 rows trained, like TRL: 1 question held out (eval_fraction 0 crashes run_sft on an empty eval
        # list at the time of writing); the held-out eval runs outside the timed steps anyway
        "eval_fraction": 0.001,
        "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False, "precision": "fp32", "save_steps": 100000,
    }
    sides.append(bl.ours_side(ctx, "ours_sft", STAGE, want, config="run_sft, packed dense 4x512, fp32"))
    return sides


def rows(results: list[dict], ctx: bl.Ctx) -> list[dict]:
    ours = next((r for r in results if r["role"] == "ours"), None)
    trl = [r for r in results if r["role"] == "trl"]
    b = bl.best(trl, "tokens_per_s")
    o = bl.metric(ours, "tokens_per_s", STAGE)
    t = b["tokens_per_s"] if b else None
    out = [{"stage": "SFT", "metric": "tokens/s", "ours": o, "trl": t, "trl_side": b["name"] if b else "-",
            "ratio": bl.ratio(o, t), "goal": GOAL, "ours_rss": bl.rss(ours), "trl_rss": bl.rss(b)}]
    for r in trl:  # every TRL config, for the record
        out.append({"stage": "SFT", "metric": f"tokens/s vs {r['name']}", "ours": o,
                    "trl": r.get("tokens_per_s"), "trl_side": r["name"], "ratio": bl.ratio(o, r.get("tokens_per_s")),
                    "ours_rss": bl.rss(ours), "trl_rss": bl.rss(r)})
    return out


if __name__ == "__main__":
    import run_all

    run_all.main(["--only", STAGE, *sys.argv[1:]])
