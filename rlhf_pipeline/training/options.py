"""Config fields shared by the training stages. Each stage composes only the options it reads; stages override
defaults by redeclaring a field.

    TrainingOptions   every training stage (SFT, reward, PPO, DPO): data, output, optimizer, LoRA, precision, ...
    LoopOptions       + what training/loop.train_loop and the held-out evaluation read (SFT, reward, DPO; not PPO,
                      which counts PPO steps and minibatches instead): epochs/max steps, accumulation, logging,
                      max_eval_samples
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from rlhf_pipeline.modeling.options import ModelOptions
from rlhf_pipeline.tracking import TrackingOptions


class LoRAOptions(ModelOptions):
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names that get LoRA adapters, comma-separated (StackLLaMA: q_proj,v_proj).",
    )


class TrainingOptions(LoRAOptions, TrackingOptions):
    """What every training stage reads."""

    model_config = ConfigDict(allow_inf_nan=False)  # `--learning-rate inf` is an input error, not a diverged run

    data: str = Field(..., description="Directory written by `rlhf prepare-data` (holds <subset>.parquet).")
    output: str = Field(..., description="Stage output directory (checkpoints, model, metrics.json); rerun to resume.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast compute dtype on top of --precision weights (accelerate's mixed_precision); "
        "bf16 is faster on CPUs with AVX512_BF16 and on GPUs.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (recompute activations).")
    cpu_kernels: Literal["off", "eager", "fused"] = Field(
        "off",
        description="CPU-only speed-ups (rlhf_pipeline/cpu; ignored on a GPU): eager = a cheaper LoRA "
        "dropout draw and batched-matmul attention for pair batches; fused = also torch.compile'd RMSNorm / "
        "SiLU-MLP / dropout / softmax and thread-split frozen bf16 matmuls (needs a C++ compiler and the `cpu` extra).",
    )
    max_train_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept (the newest); more keep the policy at several steps for the KL frontier."
    )
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice).")
    restart: bool = Field(
        False, description="Discard what a previous run left in --output (checkpoints, model, result) and start over."
    )

    @model_validator(mode="after")
    def _fp16_has_a_gradient_scaler(self):
        problem = self.fp16_problem()
        if problem:
            raise ValueError(problem)
        return self

    def fp16_problem(self) -> str | None:
        """Why these options would train in fp16 without a gradient scaler (small gradients flush to zero), or None.

        fp16 weights (the LoRA weights stay fp32) backpropagate through fp16 activations; accelerate scales the
        loss only with mixed_precision fp16 (and only on a GPU: build_accelerator refuses it elsewhere).
        """
        if self.precision == "fp16" and self.mixed_precision != "fp16":
            return (
                f"precision fp16 with mixed_precision {self.mixed_precision} trains without a gradient scaler: "
                "use precision bf16 or fp32, or mixed_precision fp16 (GPU only)"
            )
        return None


class LoopOptions(TrainingOptions):
    """What training/loop.train_loop (epochs of a dataset, accumulation, logging) and the held-out evaluation read:
    the SFT, reward and DPO stages."""

    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use at most this many evaluation rows.")
    logging_steps: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
