"""Which prompts, how long, and the sampled responses: PPO's rollouts. The schedule is a function of (seed, step)
only, so a resumed run replays exactly the rollouts an uninterrupted one would have sampled."""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext

import torch

from rlhf_pipeline.modeling.generation import Rollout, decode_responses, eos_token_ids, sample_responses
from rlhf_pipeline.training.loop import epoch_order


def prompt_indices(step: int, batch_size: int, num_prompts: int, seed: int) -> list[int]:
    """The prompts of PPO step `step`: consecutive epochs of shuffled prompt orders."""
    first = step * batch_size
    return [epoch_order(num_prompts, seed, i // num_prompts)[i % num_prompts] for i in range(first, first + batch_size)]


def response_length(step: int, seed: int, min_new_tokens: int, max_new_tokens: int) -> int:
    """The response length of step `step`, drawn in [min, max] (StackLLaMA's length sampler)."""
    return random.Random(seed * 1_000_003 + step).randint(min_new_tokens, max_new_tokens)


def step_prompts(
    step: int, questions: list[str], prompt_ids: list[list[int]], cfg, process_index: int = 0, num_processes: int = 1
) -> tuple[list[str], list[list[int]]]:
    """The questions of PPO step `step` and their encoded prompts: this process's share of the step's
    `cfg.batch_size` rows (the global batch: batch_size / samples_per_prompt prompts, each repeated
    samples_per_prompt times in a row), contiguous and in rank order, so gathering the processes' shares gives the
    1-process batch back."""
    k = getattr(cfg, "samples_per_prompt", 1)  # each prompt k times in a row: a group never spans two processes
    batch = [i for i in prompt_indices(step, cfg.batch_size // k, len(questions), cfg.seed) for _ in range(k)]
    share = len(batch) // num_processes
    batch = batch[process_index * share : (process_index + 1) * share]
    return [questions[i] for i in batch], [prompt_ids[i] for i in batch]


def process_rng(accelerator, seed: int, step: int):
    """With several processes: a random state of its own for this process's sampling in step `step`, a function of
    (seed, step, rank), so the ranks draw different samples while the global random state (the minibatch order of
    the update) stays the same on every rank, and a resumed run draws the same samples. With one process: nothing
    (the global state, as a 1-process run always did)."""
    if accelerator.num_processes == 1:
        return nullcontext()
    return _forked_rng(accelerator, (seed * 1_000_003 + step) * 1_009 + accelerator.process_index)


@contextmanager
def _forked_rng(accelerator, seed: int):
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sample_rollout(model, tokenizer, prompt_ids: list[list[int]], step: int, cfg) -> tuple[Rollout, list[str]]:
    """Step (1): one response per prompt from the policy (eval mode, KV cache, left-padded prompts), of the length
    drawn for this step; returns the rollout and the decoded responses."""
    model.eval()
    max_new = response_length(step, cfg.seed, cfg.min_new_tokens, cfg.max_new_tokens)
    rollout = sample_responses(
        model.policy,
        prompt_ids,
        max_new_tokens=max_new,
        eos_token_id=eos_token_ids(model.policy, tokenizer),  # every EOS id of the generation config
        pad_token_id=tokenizer.pad_token_id,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        force_length=cfg.force_length,
        backend=cfg.generation_backend,
        chunk_size=cfg.rollout_chunk(),  # the KV cache holds one chunk's rows, not the batch's
    )
    return rollout, decode_responses(tokenizer, rollout)


GENERATIONS_TABLE = "generations/samples.json"


def log_generations(
    run, step: int, questions: list[str], responses: list[str], scores, *, every: int, first: bool
) -> None:
    """The step's samples appended to ONE long table, GENERATIONS_TABLE (columns step, question, model, response,
    reward; MLflow's log_table appends to an existing artifact_file), every `every` steps and on the first step a
    call runs: the MLflow UI's evaluation view filters and compares it by step."""
    if (step + 1) % every != 0 and not first:
        return
    run.log_table(
        {
            "step": [step + 1] * len(responses),
            "question": questions,
            "model": ["ppo"] * len(responses),
            "response": responses,
            "reward": [float(x) for x in scores.tolist()],
        },
        artifact_file=GENERATIONS_TABLE,
    )
