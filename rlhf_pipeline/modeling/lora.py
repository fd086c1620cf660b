"""LoRA adapters for every training stage: wrap a base model, and write the adapter plus a merged full model.

    apply_lora(model, cfg, task_type)          -> PeftModel (only LoRA weights, and the score head for SEQ_CLS, train)
    save_adapter_and_merged(model, tok, out)   -> (out/adapter, out/merged)

`cfg` is any config with the LoRAOptions fields (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`)
plus `quantization` and `gradient_checkpointing` (every TrainingOptions subclass has them).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

TaskType = str  # "CAUSAL_LM" or "SEQ_CLS" (peft.TaskType values)


def apply_lora(model, cfg: Any, task_type: TaskType = "CAUSAL_LM"):
    """Freeze `model` and add LoRA adapters on `cfg.lora_target_modules`; returns the PeftModel.

    For SEQ_CLS, peft adds the classification head (`score` / `classifier`) to `modules_to_save`, so the freshly
    initialised one-logit head is trained and saved with the adapter. A quantized (4/8-bit) base is first
    frozen by `prepare_kbit_base`, which keeps its non-quantized weights in their dtype (see there).
    """
    from peft import LoraConfig, get_peft_model

    checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
    if getattr(cfg, "quantization", "none") != "none":
        prepare_kbit_base(model)
    if checkpointing:
        # Non-reentrant checkpointing needs no `enable_input_require_grads` hack for frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type=task_type,
    )
    peft_model = get_peft_model(model, lora)
    if getattr(cfg, "mixed_precision", "no") != "no":
        # Under autocast the LoRA matmuls run in the autocast dtype anyway: peft's cast of every LoRA input to
        # the fp32 adapter dtype is a copy that autocast immediately undoes (measurable in a bf16 reward-model step).
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    # Trainable weights in fp32 on a bf16/fp16 base (peft already does it for the LoRA matrices; this also covers
    # the score head in modules_to_save): AdamW updates of 1e-5 relative size vanish in bf16's 8-bit mantissa.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return peft_model


def prepare_kbit_base(model) -> None:
    """Freeze a 4/8-bit base for LoRA, leaving every weight's dtype as loaded (the compute dtype, bf16 on a GPU).

    Why not peft's `prepare_model_for_kbit_training`: it casts every non-quantized fp16/bf16 weight -- the
    embeddings, the LM head, the norms -- to fp32. The embeddings' output then makes the residual stream fp32, so
    every activation and the KV cache of generation take twice the memory (for a 7B Llama in PPO, ~10 GiB more KV
    cache at 32 x 640 tokens), for no accuracy gain: the weights are frozen, RMSNorm computes in fp32 internally,
    and the trainable weights (LoRA, heads) are fp32 anyway (apply_lora). Its other work is kept: everything
    frozen; input gradients are not needed with non-reentrant checkpointing (apply_lora enables that).
    """
    for param in model.parameters():
        param.requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def _is_quantized(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def _merge_from_disk(adapter_dir: Path, base_model) -> torch.nn.Module:
    """Merge into a freshly loaded full-precision copy of the base: merging into 4/8-bit weights would round them."""
    from peft import PeftModel

    config = base_model.config
    from rlhf_pipeline.modeling.loading import pick_device, torch_dtype

    dtype = torch_dtype("auto", pick_device())  # bf16 only on a GPU that computes it natively
    kwargs = (
        {"num_labels": config.num_labels}
        if config.architectures and "ForSequenceClassification" in (config.architectures[0])
        else {}
    )
    fresh = type(base_model).from_pretrained(config._name_or_path, dtype=dtype, use_safetensors=True, **kwargs)
    fresh.config.pad_token_id = config.pad_token_id
    return PeftModel.from_pretrained(fresh, str(adapter_dir)).merge_and_unload()


def _replace_dir(tmp: Path, final: Path) -> None:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_adapter_and_merged(model, tokenizer, output: str | Path) -> tuple[Path, Path]:
    """Write `<output>/adapter/` (LoRA weights [+ score head]) and `<output>/merged/` (full model + tokenizer).

    Both are safetensors and both are written to a temporary directory first, so a crash never leaves a
    half-written model that a rerun would mistake for a finished one. Call this LAST: for a full-precision base
    the merge happens in place (no second copy of the weights in memory), which unloads the adapters from `model`.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    tmp_adapter, tmp_merged = out / ".tmp-adapter", out / ".tmp-merged"
    for tmp in (tmp_adapter, tmp_merged):
        shutil.rmtree(tmp, ignore_errors=True)

    model.save_pretrained(str(tmp_adapter), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_adapter))
    _replace_dir(tmp_adapter, adapter_dir)

    base = model.get_base_model()
    merged = _merge_from_disk(adapter_dir, base) if _is_quantized(model) else model.merge_and_unload()
    if getattr(merged.config, "pad_token_id", None) is None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    merged.config.use_cache = True  # training turned it off for gradient checkpointing; generation wants it
    merged.save_pretrained(str(tmp_merged), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_merged))
    _replace_dir(tmp_merged, merged_dir)
    return adapter_dir, merged_dir
