"""Which prompts and how long: PPO's rollout schedule, a function of (seed, step) only, so a resumed run replays
exactly the rollouts an uninterrupted one would have sampled."""

from __future__ import annotations

import random

from rlhf_pipeline.training.loop import epoch_order


def prompt_indices(step: int, batch_size: int, num_prompts: int, seed: int) -> list[int]:
    """The prompts of PPO step `step`: consecutive epochs of shuffled prompt orders."""
    first = step * batch_size
    return [epoch_order(num_prompts, seed, i // num_prompts)[i % num_prompts] for i in range(first, first + batch_size)]


def response_length(step: int, seed: int, min_new_tokens: int, max_new_tokens: int) -> int:
    """The response length of step `step`, drawn in [min, max] (StackLLaMA's length sampler)."""
    return random.Random(seed * 1_000_003 + step).randint(min_new_tokens, max_new_tokens)
