"""The trainable model of every training stage: LoRA on the frozen base, then the CPU kernels a recipe asks for."""

from __future__ import annotations

from typing import Any

from rlhf_pipeline.modeling.lora import TaskType, apply_lora


def trainable_model(base_model, cfg: Any, task_type: TaskType = "CAUSAL_LM"):
    """apply_lora(base_model, cfg, task_type), then `rlhf_pipeline.cpu.speed_up` when `cfg.cpu_kernels` is not off
    (imported only then: the CPU kernels are never part of a default or GPU run)."""
    peft_model = apply_lora(base_model, cfg, task_type)
    level = getattr(cfg, "cpu_kernels", "off")
    if level != "off":
        from rlhf_pipeline.cpu import speed_up

        speed_up(peft_model, level)
    return peft_model
