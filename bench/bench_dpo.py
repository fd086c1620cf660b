"""DPO pairs/s: our `run_dpo` vs TRL 1.16 `DPOTrainer` (shared script trl_dpo.py).

Work: the 256 peer pairs with an explicit prompt, 4 pairs per step, max length 512, sigmoid loss beta 0.1,
LoRA r16/alpha32/dropout0.05 on q_proj,v_proj, constant lr 5e-5, fp32, 2 threads, 10 steps (first excluded).
Reference = the policy with the adapter disabled, computed every step (TRL's default with PEFT). TRL denominator:
best of fp32 (the peers' default) and bf16 autocast + gradient checkpointing (TRL's defaults).

    python bench/bench_dpo.py [--quick] [--variants all|default]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

STAGE = "dpo"
GOAL = 1.3


def plan(ctx: bl.Ctx) -> list[dict]:
    steps = ctx.steps(10, 4)
    common = [
        "--steps",
        steps,
        "--batch",
        4,
        "--max-length",
        512,
        "--beta",
        0.1,
        "--lr",
        5e-5,
        "--lora-r",
        16,
        "--lora-alpha",
        32,
        "--lora-dropout",
        0.05,
        "--lora-targets",
        "q_proj,v_proj",
    ]
    sides = [bl.trl_side(ctx, "trl_dpo", "trl_dpo.py", common, config="fp32, ref = adapter off each step")]
    if ctx.variants == "all":
        sides.append(
            bl.trl_side(
                ctx,
                "trl_dpo_bf16_ckpt",
                "trl_dpo.py",
                [*common, "--bf16", 1, "--grad-ckpt", 1],
                config="bf16 autocast + grad-ckpt (TRL defaults)",
            )
        )
        sides.append(bl.trl_side(ctx, "trl_dpo_bf16", "trl_dpo.py", [*common, "--bf16", 1], config="bf16 autocast"))
        sides.append(
            bl.trl_side(
                ctx,
                "trl_dpo_bf16_eager",
                "trl_dpo.py",
                [*common, "--bf16", 1],
                attention="eager",
                config="bf16 autocast, eager attention",
            )
        )
    want = {
        "max_steps": steps,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_length|max_seq_length|seq_length": 512,
        "beta": 0.1,
        "loss|loss_type": "dpo",
        "precompute_ref": False,  # reference forward every step, like the TRL peer's default
        "eval_fraction": 0.0,  # all 256 pairs in the training pool, like TRL (which does no eval here)
        "learning_rate": 5e-5,
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
    sides.append(bl.ours_side(ctx, "ours_dpo", STAGE, want, config="run_dpo, fp32, shared-prefix rows"))
    bf16 = bl.bf16_knob(STAGE)
    if bf16:
        sides.append(
            bl.ours_side(
                ctx,
                "ours_dpo_bf16",
                STAGE,
                {**want, **bf16},
                config="run_dpo, bf16 base + autocast, shared-prefix rows",
            )
        )
    return sides


def rows(results: list[dict], ctx: bl.Ctx) -> list[dict]:
    ours = [r for r in results if r["role"] == "ours"]
    for r in ours:
        r["pairs_per_s"] = bl.metric(r, "pairs_per_s", STAGE)
    trl = [r for r in results if r["role"] == "trl"]
    return bl.compare_rows("DPO", "pairs/s", ours, trl, "pairs_per_s", GOAL)


if __name__ == "__main__":
    import run_all

    run_all.main(["--only", STAGE, *sys.argv[1:]])
