"""What a PPO step logs (`ppo/...` per step, over the global batch) and what metrics.json summarizes."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.distributed import gather_rows
from rlhf_pipeline.training.losses import masked_mean


def summarize(history: list[dict], cfg: PPOConfig) -> dict:
    """metrics.json: first/last step reward and KL, steady-state throughput (step 1 = warm-up, excluded)."""
    steady = history[1:] or history
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    steady_seconds = sum(cfg.batch_size / r["samples_per_s"] for r in steady)
    return {
        "steps": len(history),
        "samples": len(history) * cfg.batch_size,
        "reward_first": history[0]["reward_mean"],
        "reward_last": history[-1]["reward_mean"],
        "kl_first": history[0]["kl"],
        "kl_last": history[-1]["kl"],
        "kl_coef_last": history[-1]["kl_coef"],
        "reward_mean_last5": mean("reward_mean", history[-5:]),
        "kl_mean_last5": mean("kl", history[-5:]),
        "skipped_updates": history[-1]["skipped_updates"],
        "ppo/samples_per_s": len(steady) * cfg.batch_size / steady_seconds,
        "ppo/tokens_per_s": sum(r["tokens_per_s"] * cfg.batch_size / r["samples_per_s"] for r in steady)
        / steady_seconds,
        "history": history,
    }


class Stopwatch:
    """A PPO step's wall clock: `with clock("generate"): ...` records that block's seconds in `clock.seconds`."""

    def __init__(self):
        self.began, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, name: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - tic

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def step_metrics(
    scores,
    raw_scores,
    sequence_kl: float,
    kl_coef: float,
    entropy,
    mask,
    has_eos,
    update: dict,
    skipped: int,
    clock: Stopwatch,
    cfg: PPOConfig,
) -> dict[str, float]:
    """One PPO step's MLflow metrics (`ppo/...`) over the step's (global) batch: per-response `scores`,
    `raw_scores`, `has_eos` [B], per-token `entropy` and response `mask` [B, R]; `update` is ppo_update's stats less
    skipped_updates."""
    seconds, n_tokens = clock.elapsed(), float(mask.sum())
    update = dict(update)
    return {
        "ppo/reward_mean": float(scores.mean()),
        "ppo/reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "ppo/reward_raw_mean": float(raw_scores.mean()),
        "ppo/kl": sequence_kl,
        "ppo/kl_coef": kl_coef,
        "ppo/entropy": float(masked_mean(entropy, mask)),
        "ppo/response_length": float(mask.sum(-1).mean()),
        "ppo/eos_rate": float(has_eos.float().mean()),
        "ppo/explained_variance": update.pop("explained_variance"),
        **{f"ppo/{k}": v for k, v in update.items()},
        "ppo/skipped_updates": float(skipped),
        "ppo/tokens_per_s": n_tokens / seconds,
        "ppo/samples_per_s": cfg.batch_size / seconds,
        **{f"ppo/time_{k}_s": v for k, v in clock.seconds.items()},
    }


class Gathered:
    """The per-response quantities of step_metrics over the global batch (this process's own with one)."""

    def __init__(self, scores, raw_scores, entropy, mask, has_eos):
        self.scores, self.raw_scores, self.entropy, self.mask, self.has_eos = scores, raw_scores, entropy, mask, has_eos

    @classmethod
    def of(cls, accelerator, scores, raw_scores, entropy, mask, has_eos) -> Gathered:
        if accelerator.num_processes == 1:
            return cls(scores, raw_scores, entropy, mask, has_eos)
        return cls(
            *(gather_rows(accelerator, t).cpu() for t in (scores, raw_scores.float(), entropy.float(), mask)),
            gather_rows(accelerator, has_eos.to(torch.int64)).cpu().bool(),
        )
