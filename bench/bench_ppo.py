"""PPO samples/s and generated tokens/s: our `run_ppo` vs classic TRL 0.11.4 `PPOTrainer` (trl_ppo_legacy.py, in
its legacy venv) and vs TRL 1.16 `RLOOTrainer` (trl_online_rl.py --algo rloo; TRL 1.x has no PPOTrainer).

Work per step, equal on both sides of each comparison: 8 samples, sampling (temperature 1, top_k 0, top_p 1) of
exactly 48 new tokens (min_new_tokens = max_new_tokens = 48, as the peers force it), a scalar reward from a SEQ_CLS
model on the same SmolLM2 backbone, KL to the reference = policy with the adapter off, LoRA r16/alpha32/dropout0.05
on q_proj,v_proj, 2 threads, 5 steps (first excluded).
  * vs TRL 0.11.4 PPOTrainer: 8 prompts, 4 PPO epochs over one mini-batch of 8 (StackLLaMA), fp32 (the legacy
    script has no bf16 switch); ours in fp32 and in our bf16 setting.
  * vs TRL 1.16 RLOOTrainer: RLOO needs >= 2 completions per prompt, so 4 prompts x 2 = 8 samples, one gradient
    step per batch (num_iterations = 1) -> our PPO with 1 PPO epoch; TRL in fp32, bf16, bf16 + grad-ckpt.
Reward model: the peers use the base checkpoint with an untrained score head; ours needs a reward-stage output
dir, so we use the one the reward benchmark just trained (or train a 2-step one, unmeasured) -- the same
backbone either way, so the same cost per forward.

    python bench/bench_ppo.py [--quick] [--variants all|default]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

STAGE = "ppo"
GOAL = 1.5


def reward_dir(ctx: bl.Ctx) -> Path:
    return ctx.out / "ours" / "ours_reward"


def plan(ctx: bl.Ctx) -> list[dict]:
    steps = ctx.steps(5, 3)
    lora = ["--lora-r", 16, "--lora-alpha", 32, "--lora-dropout", 0.05, "--lora-targets", "q_proj,v_proj"]
    sides = []
    if bl.legacy_python().exists():
        sides.append(
            bl.trl_side(
                ctx,
                "trl_ppo_legacy",
                "trl_ppo_legacy.py",
                ["--steps", steps, "--batch", 8, "--mini-batch", 8, "--ppo-epochs", 4, "--new-tokens", 48],
                legacy=True,
                peer="ppo_legacy",
                config="TRL 0.11.4 PPOTrainer, 8 samples, mb 8, 4 epochs, fp32",
            )
        )
    # RLOO at EQUAL work: 8 samples per step (4 prompts x 2 completions: RLOO needs >= 2), one gradient step
    # per batch (TRL's num_iterations = 1) -> compared with our PPO at 1 PPO epoch.
    rloo = ["--algo", "rloo", "--steps", steps, "--prompts", 4, "--num-generations", 2, "--new-tokens", 48, *lora]
    sides.append(
        bl.trl_side(
            ctx,
            "trl_rloo",
            "trl_online_rl.py",
            rloo,
            peer="rloo",
            config="TRL 1.16 RLOOTrainer, 4 prompts x 2 = 8 samples, fp32",
        )
    )
    if ctx.variants == "all":
        sides.append(
            bl.trl_side(
                ctx,
                "trl_rloo_bf16",
                "trl_online_rl.py",
                [*rloo, "--bf16", 1],
                peer="rloo",
                config="RLOO, 8 samples, bf16 autocast",
            )
        )
        sides.append(
            bl.trl_side(
                ctx,
                "trl_rloo_bf16_ckpt",
                "trl_online_rl.py",
                [*rloo, "--bf16", 1, "--grad-ckpt", 1],
                peer="rloo",
                config="RLOO, 8 samples, bf16 autocast + grad-ckpt (TRL defaults)",
            )
        )
    # our PPO needs a reward-stage output: reuse the measured reward run, else make a tiny unmeasured one
    setup = bl.ours_side(
        ctx,
        "ours_reward_for_ppo",
        "reward",
        {
            "max_steps": 2,
            "batch_size": 4,
            "lora_r": 8,
            "lora_alpha": 32,
            "lora_dropout": 0.1,
            "precision": "fp32",
            "save_steps": 100000,
            "eval_fraction": 0.02,
            **({"eval_before": False} if "eval_before" in bl.config_fields("reward") else {}),
        },
        config="setup only (not measured)",
    )
    setup["role"] = "setup"
    setup["skip"] = lambda: (reward_dir(ctx) / "metrics.json").is_file()
    sides.append(setup)

    def rm_dir() -> str:
        d = reward_dir(ctx)
        return str(d if (d / "metrics.json").is_file() else ctx.out / "ours" / "ours_reward_for_ppo")

    want = {
        "steps|ppo_steps|max_steps": steps,
        "batch_size": 8,
        "mini_batch_size": 8,
        "ppo_epochs": 4,
        "gradient_accumulation_steps": 1,
        "max_new_tokens|response_length|new_tokens": 48,
        "min_new_tokens": 48,
        "force_length": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "learning_rate": 1.41e-5,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "gradient_checkpointing": False,
        "precision": "fp32",
        "save_steps": 100000,
        "reward_model": rm_dir,  # resolved when the side starts
    }
    bf16 = bl.bf16_knob(STAGE) or {}
    for epochs, peer in ((4, "ppo_legacy"), (1, "rloo")):
        suffix = "" if epochs == 4 else "_e1"
        sides.append(
            bl.ours_side(
                ctx,
                f"ours_ppo{suffix}",
                STAGE,
                {**want, "ppo_epochs": epochs},
                vs=peer,
                config=f"run_ppo, 8 prompts, mb 8, {epochs} epoch(s), 48 forced tokens, fp32",
            )
        )
        if bf16:
            sides.append(
                bl.ours_side(
                    ctx,
                    f"ours_ppo{suffix}_bf16",
                    STAGE,
                    {**want, "ppo_epochs": epochs, **bf16},
                    vs=peer,
                    config=f"run_ppo, same, {epochs} epoch(s), bf16 base + autocast",
                )
            )
    # ours first, then classic PPO, then RLOO: on a busy machine the most important pairs finish first
    return [s for s in sides if s["role"] != "trl"] + [s for s in sides if s["role"] == "trl"]


def _gen_tok(r):
    if r is None or r.get("failed"):
        return None
    if r.get("role") == "ours":
        # generated (response) tokens over the steady steps' time, as TRL's figure is (total / total, step 1 out)
        hist = (r.get("metrics") or {}).get("history") or []
        steady = hist[1:] or hist
        if steady and all(h.get("samples_per_s") and h.get("response_length") is not None for h in steady):
            b = r["config_used"]["batch_size"]
            return round(sum(h["response_length"] * b for h in steady) / sum(b / h["samples_per_s"] for h in steady), 2)
        for k in ("gen_tokens_per_s", "generated_tokens_per_s", "response_tokens_per_s", "tokens_per_s"):
            v = bl.metric(r, k, STAGE)
            if v is not None:
                return v
        return None
    return r.get("gen_tokens_per_s")


def rows(results: list[dict], ctx: bl.Ctx) -> list[dict]:
    out = []
    for r in results:
        if r["role"] == "ours":
            r["samples_per_s"] = bl.metric(r, "samples_per_s", STAGE)
        r["gen_tokens_per_s"] = _gen_tok(r)
    for peer, label in (("ppo_legacy", "TRL 0.11.4 PPOTrainer (4 epochs)"), ("rloo", "TRL 1.16 RLOOTrainer (1 epoch)")):
        ours = [r for r in results if r["role"] == "ours" and r.get("vs") == peer]
        trl = [r for r in results if r["role"] == "trl" and r.get("peer") == peer]
        out += bl.compare_rows(f"PPO vs {label}", "samples/s", ours, trl, "samples_per_s", GOAL)
        out += bl.compare_rows(f"PPO vs {label}", "generated tokens/s", ours, trl, "gen_tokens_per_s", GOAL)
    return out


if __name__ == "__main__":
    import run_all

    run_all.main(["--only", STAGE, *sys.argv[1:]])
