"""Tiny configs of every training stage, and a stage run in a forked child process that a test can kill.

Forking (not a fresh interpreter) keeps a kill/rerun cycle at the cost of the run itself: torch, transformers and
MLflow are already imported. The child reports a UserError as the CLI does (one line, its exit status), so a test
sees what a user or Kubeflow would: the status, the one line, and what is left on disk and in MLflow.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from pathlib import Path

from sft_reward_helpers import make_data_dir

from rlhf_pipeline.errors import UserError

FORK = multiprocessing.get_context("fork")
STEPS = 8


def ppo_reward(questions, responses, rollout):
    """A toy reward: the share of even token ids in the response (deterministic, no reward model to load)."""
    ids, mask = rollout.response_ids, rollout.response_mask.float()
    return ((ids % 2 == 0).float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def stage_config(stage: str, model_dir: Path, data_dir: Path, output: Path, **overrides):
    """An 8-step run of `stage` on the tiny model, LoRA dropout ON (0.05; PPO switches dropout off by design, see
    ppo/policy.disable_dropout), a checkpoint every 2 steps, registration on."""
    common = dict(
        model=str(model_dir), data=str(data_dir), output=str(output), num_threads=1, save_steps=2, lora_dropout=0.05
    )
    if stage == "sft":
        from rlhf_pipeline.training.sft import SFTConfig

        values = dict(seq_length=32, batch_size=2, max_steps=STEPS, learning_rate=5e-3, eval_fraction=0.25)
        return SFTConfig(**{**common, **values, **overrides})
    if stage == "reward":
        from rlhf_pipeline.training.reward import RewardConfig

        values = dict(max_length=64, batch_size=4, max_steps=STEPS, learning_rate=3e-3, eval_fraction=0.25)
        return RewardConfig(**{**common, **values, **overrides})
    if stage == "dpo":
        from rlhf_pipeline.training.dpo import DPOConfig

        values = dict(max_length=96, batch_size=4, max_steps=STEPS, learning_rate=2e-3, lora_r=4, eval_fraction=0.25)
        return DPOConfig(**{**common, **values, **overrides})
    if stage == "ppo":
        from rlhf_pipeline.ppo.config import PPOConfig

        values = dict(
            steps=STEPS,
            batch_size=4,
            mini_batch_size=2,
            ppo_epochs=1,
            min_new_tokens=3,
            max_new_tokens=5,
            force_length=False,
            learning_rate=2e-3,
            lora_r=4,
            max_prompt_length=64,
            log_generations_every=100,
        )
        return PPOConfig(**{**common, **values, **overrides})
    raise ValueError(stage)


def run_stage(stage: str, cfg):
    if stage == "sft":
        from rlhf_pipeline.training.sft import run_sft

        return run_sft(cfg)
    if stage == "reward":
        from rlhf_pipeline.training.reward import run_reward

        return run_reward(cfg)
    if stage == "dpo":
        from rlhf_pipeline.training.dpo import run_dpo

        return run_dpo(cfg)
    from rlhf_pipeline.ppo.trainer import run_ppo

    return run_ppo(cfg, reward_fn=ppo_reward)


def data_for(tmp: Path) -> Path:
    """Prepared data every stage can read (finetune, reward, rl and evaluation subsets)."""
    data = make_data_dir(tmp / "data")
    import shutil

    shutil.copy(data / "reward.parquet", data / "rl.parquet")
    return data


def _child(stage: str, cfg, stderr_path: str, kill_in_save: tuple[int, int] | None) -> None:
    err = open(stderr_path, "a")
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    if kill_in_save is not None:
        _kill_during_save(*kill_in_save)
    try:
        run_stage(stage, cfg)
    except UserError as exc:
        print(f"rlhf {stage}: error: {exc}", file=sys.stderr, flush=True)
        os._exit(exc.exit_code)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def _kill_during_save(step: int, sig: int) -> None:
    """Send `sig` to this process halfway through writing step `step`'s checkpoint (after its first file)."""
    from rlhf_pipeline.training import checkpoint

    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if f".tmp-step-{step}" in str(path) and path.endswith("trainable.safetensors"):
            os.kill(os.getpid(), sig)

    checkpoint.save_file = save_file


def start(stage: str, cfg, stderr_path: Path, kill_in_save: tuple[int, int] | None = None):
    proc = FORK.Process(target=_child, args=(stage, cfg, str(stderr_path), kill_in_save))
    proc.start()
    return proc


def run_to_end(stage: str, cfg, stderr_path: Path, timeout: float = 300) -> int:
    proc = start(stage, cfg, stderr_path)
    proc.join(timeout)
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        raise AssertionError(f"{stage} did not finish in {timeout} s")
    return proc.exitcode
