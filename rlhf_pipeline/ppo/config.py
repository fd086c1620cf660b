"""`PPOConfig`: every option of `rlhf ppo`, documented once (the CLI help and the pipeline's parameter docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_pipeline.modeling.options import GenerationOptions
from rlhf_pipeline.training.options import TrainingOptions


class PPOConfig(TrainingOptions, GenerationOptions):
    """TrainingOptions only: PPO counts PPO steps and minibatches (steps, batch_size, mini_batch_size, ppo_epochs),
    so the loop options of SFT/reward/DPO (max_steps, num_epochs, gradient_accumulation_steps, logging_steps,
    max_eval_samples) are unknown options here, not silently ignored ones."""

    reward_model: str | None = Field(
        None, description="The reward stage's output dir (merged/, adapter/, metrics.json)."
    )
    steps: int = Field(20, gt=0, description="Number of PPO steps (each: sample, score, update).")
    batch_size: int = Field(
        8, gt=0, description="Sampled responses per PPO step (batch_size / samples_per_prompt prompts)."
    )
    mini_batch_size: int = Field(8, gt=0, description="Responses per PPO optimizer step.")
    samples_per_prompt: int = Field(
        1,
        gt=0,
        description="Responses sampled per prompt in a step (batch_size counts responses: batch_size / this "
        "prompts per step, each answered this many times).",
    )
    reward_baseline: Literal["none", "leave_one_out"] = Field(
        "none",
        description="leave_one_out: each response's score minus the mean score of the other responses to its prompt "
        "(RLOO's baseline; needs samples_per_prompt >= 2), so the reward's spread between questions, which no "
        "answer can change, stays out of the advantages. The logged rewards stay the scores.",
    )
    rollout_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows generated, scored and passed through the reference, old and update forwards at once "
        "(default: the whole batch): peak GPU memory scales with it, not with batch_size; results are the same.",
    )
    ppo_epochs: int = Field(4, gt=0, description="Passes over each step's rollouts.")
    learning_rate: float = Field(1.41e-5, gt=0, description="AdamW learning rate (StackLLaMA: 1.41e-5).")
    lr_scheduler: str = Field("constant", description="transformers scheduler name (PPO: constant).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of optimizer steps with linear warm-up.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; 0 so old and new log-probs agree.")
    save_steps: int = Field(10, gt=0, description="Checkpoint every N PPO steps (and at the end).")
    min_new_tokens: int = Field(32, gt=0, description="Response length is sampled per step in [min, max] new tokens.")
    max_new_tokens: int = Field(128, gt=0, description="Upper end of the sampled response length.")
    force_length: bool = Field(False, description="Suppress EOS until the sampled length (fixed-length responses).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also applied to the log-probs).")
    reward_clip: float | None = Field(None, gt=0, description="Clip normalized rewards to [-c, c].")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from responses without EOS.")
    kl_estimator: Literal["k1", "k3", "abs"] = Field("k1", description="Per-token KL estimator for the penalty.")
    init_kl_coef: float = Field(0.2, ge=0, description="Initial KL penalty coefficient (beta).")
    adaptive_kl: bool = Field(True, description="Adapt beta toward --target-kl (Ziegler et al.); else constant.")
    target_kl: float = Field(6.0, gt=0, description="Target KL per response (summed over tokens).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon (samples).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient.")
    early_stop_kl: float | None = Field(None, gt=0, description="Stop the step's epochs when approx-KL exceeds this.")
    critic_trains_policy: bool = Field(
        True,
        description="The value loss also trains the policy's LoRA weights (one shared trunk, as TRL's value-head "
        "model); off: it trains the value head alone, so the critic's gradient never moves the policy.",
    )
    value_head_init: Literal["zero", "reward"] = Field(
        "zero", description="Value head start: zeros, or the reward model's score head when the shapes match."
    )
    share_reward_base: bool = Field(
        True,
        description="Load the reward model as a frozen second adapter on the policy's base when its "
        "adapter was trained on the same SFT model (one copy of the weights); else load it separately.",
    )
    log_generations_every: int = Field(
        10,
        gt=0,
        description="Every N steps (and on the first) append the step's samples to the one MLflow table "
        "generations/samples.json (step, question, model, response, reward).",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) > batch_size ({self.batch_size})")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size ({self.batch_size}) is not a multiple of samples_per_prompt ({self.samples_per_prompt})"
            )
        if self.reward_baseline == "leave_one_out" and self.samples_per_prompt < 2:
            raise ValueError("reward_baseline leave_one_out needs samples_per_prompt >= 2 (the other answers)")
        return self

    def rollout_chunk(self) -> int:
        """Rows per forward / generation chunk (rollout_batch_size, at most the batch)."""
        return min(self.rollout_batch_size or self.batch_size, self.batch_size)

    def fp16_problem(self) -> str | None:
        """PPO's update calls loss.backward() itself: accelerate's gradient scaler never sees it (ppo/trainer.py)."""
        if "fp16" in (self.precision, self.mixed_precision):
            return (
                "PPO's update has no gradient scaler, so it cannot train in fp16 (precision or "
                "mixed_precision): use bf16 or fp32"
            )
        return None
