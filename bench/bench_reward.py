"""Reward-model pairs/s: our `run_reward` vs TRL 1.16 `RewardTrainer` (shared script trl_reward.py).

Work: the 256 peer pairs (prompt + chosen / prompt + rejected), 4 pairs per step (= 8 sequences), max length 512,
LoRA r8/alpha32/dropout0.1 on q_proj,v_proj + a trained score head (SEQ_CLS), constant lr 3e-4, fp32, 2 threads,
24 steps (first excluded from the steady rate). The TRL denominator is the best of fp32 (the peers' default),
bf16 autocast + gradient checkpointing (TRL's defaults), bf16 autocast alone, and bf16 autocast with eager
attention (`model_init_kwargs`, via trl_attention.py). Both sides also report held-out
accuracy (TRL: the 64 eval pairs after training; ours: whatever its metrics.json reports), so that a faster side
that learns nothing would show.

    python bench/bench_reward.py [--quick] [--variants all|default]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

STAGE = "reward"
GOAL = 1.3


def plan(ctx: bl.Ctx) -> list[dict]:
    steps = ctx.steps(24, 6)
    common = [
        "--steps",
        steps,
        "--batch",
        4,
        "--max-length",
        512,
        "--lr",
        3e-4,
        "--lora-r",
        8,
        "--lora-alpha",
        32,
        "--lora-dropout",
        0.1,
        "--lora-targets",
        "q_proj,v_proj",
        "--skip-eval-before",
    ]
    sides = [bl.trl_side(ctx, "trl_reward", "trl_reward.py", common, config="fp32")]
    if ctx.variants == "all":
        sides += [
            bl.trl_side(
                ctx,
                "trl_reward_bf16_ckpt",
                "trl_reward.py",
                [*common, "--bf16", 1, "--grad-ckpt", 1],
                config="bf16 autocast + grad-ckpt (TRL defaults)",
            ),
            bl.trl_side(ctx, "trl_reward_bf16", "trl_reward.py", [*common, "--bf16", 1], config="bf16 autocast"),
            # eager attention (matmul + softmax) beats sdpa's CPU flash backward at these lengths, as it does for us
            bl.trl_side(
                ctx,
                "trl_reward_bf16_eager",
                "trl_reward.py",
                [*common, "--bf16", 1],
                attention="eager",
                config="bf16 autocast + eager attention",
            ),
        ]
    want = {
        "max_steps": steps,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_length|max_seq_length|seq_length": 512,
        # 26 of the 256 questions held out for accuracy (TRL: its 64 separate eval pairs); 24 x 4 = 96 training
        # pairs are drawn from the other 230 -- the same kind of pairs; eval is outside the timed steps either way
        "eval_fraction": 0.1,
        "learning_rate": 3e-4,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_r": 8,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False,
        "precision": "fp32",
        "save_steps": 100000,
    }
    if "eval_before" in bl.config_fields(STAGE):  # TRL side runs with --skip-eval-before (untimed either way)
        want["eval_before"] = False
    sides.append(bl.ours_side(ctx, "ours_reward", STAGE, want, config="run_reward, fp32, shared-prefix rows"))
    bf16 = bl.bf16_knob(STAGE)
    if bf16:
        sides.append(
            bl.ours_side(
                ctx,
                "ours_reward_bf16",
                STAGE,
                {**want, **bf16},
                config="run_reward, bf16 base + autocast, shared-prefix rows",
            )
        )
    return sides


def rows(results: list[dict], ctx: bl.Ctx) -> list[dict]:
    ours = [r for r in results if r["role"] == "ours"]
    for r in ours:
        r["pairs_per_s"] = bl.metric(r, "pairs_per_s", "rm")
    trl = [r for r in results if r["role"] == "trl"]
    bo, bt = bl.best(ours, "pairs_per_s"), bl.best(trl, "pairs_per_s")
    note = (
        f"held-out accuracy ours {bl.fmt(bl.metric(bo, 'accuracy', 'rm'))} / "
        f"TRL {bl.fmt(bt.get('eval_accuracy') if bt else None)}"
    )
    return bl.compare_rows("Reward", "pairs/s", ours, trl, "pairs_per_s", GOAL, note)


if __name__ == "__main__":
    import run_all

    run_all.main(["--only", STAGE, *sys.argv[1:]])
