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

from rlhf_pipeline.training.fused_ops import fuse_elementwise, fused, masked_scale
from rlhf_pipeline.training.row_split_matmul import split_frozen_linears

TaskType = str  # "CAUSAL_LM" or "SEQ_CLS" (peft.TaskType values)


def apply_lora(model, cfg: Any, task_type: TaskType = "CAUSAL_LM"):
    """Freeze `model` and add LoRA adapters on `cfg.lora_target_modules`; returns the PeftModel.

    For SEQ_CLS, peft adds the classification head (`score` / `classifier`) to `modules_to_save`, so the freshly
    initialised one-logit head is trained and saved with the adapter. A quantized (4/8-bit) base first goes
    through `prepare_model_for_kbit_training` (fp32 norms, input grads), as QLoRA requires.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
    if getattr(cfg, "quantization", "none") != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif checkpointing:
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
    if next(model.parameters()).device.type == "cpu":
        use_fast_dropout(peft_model)
        if getattr(cfg, "fused_kernels", False):
            fuse_elementwise(peft_model)
            split_frozen_linears(peft_model)
    if getattr(cfg, "mixed_precision", "no") != "no":
        # Under autocast the LoRA matmuls run in the autocast dtype anyway: peft's cast of every LoRA input to
        # the fp32 adapter dtype is a copy that autocast immediately undoes (~3 % of a bf16 reward-model step).
        for module in peft_model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    # Trainable weights in fp32 on a bf16/fp16 base (peft already does it for the LoRA matrices; this also covers
    # the score head in modules_to_save): AdamW updates of 1e-5 relative size vanish in bf16's 8-bit mantissa.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return peft_model


class FastDropout(torch.nn.Module):
    """Dropout that draws its keep-mask from 15-bit uniform integers, four per 64-bit random word, instead of one
    `bernoulli_` draw per element: 2.5x cheaper on a CPU, where LoRA's input dropout (a [tokens, hidden] mask per
    adapted module) was ~13 % of a reward-model step. The keep probability is (1 - p) rounded to a multiple of
    2^-15 (|error| <= 1.6e-5) and kept values are scaled by 1 / that probability, so E[output] = input exactly."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round((1.0 - p) * 32768)  # keep when the 15-bit draw < threshold
        self.scale = 32768 / self.threshold if self.threshold else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        draws = words.view(torch.int16)[:n].view(x.shape)  # 4 x 15 random bits per word (random_ leaves the sign 0)
        return fused(masked_scale)(x, draws, self.threshold, self.scale)


def use_fast_dropout(peft_model) -> int:
    """Replace the nn.Dropout of every LoRA layer with FastDropout (CPU; on GPU fused dropout is already fast)."""
    replaced = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    dropouts[name] = FastDropout(dropout.p)
                    replaced += 1
    return replaced


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
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kwargs = {"num_labels": config.num_labels} if config.architectures and "ForSequenceClassification" in (
        config.architectures[0]) else {}
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


def transformer_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, head) of a transformers CausalLM / SequenceClassification model, through a PeftModel.

    Stages call the backbone and apply the head only where a prediction is needed (labelled positions, the last
    real token), instead of computing logits for every position, padding included. The LoRA layers live inside the
    backbone, so they are active either way.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = hf.base_model  # transformers: the module named by `base_model_prefix` ("model" for Llama)
    head = hf.get_output_embeddings() if hasattr(hf, "lm_head") else getattr(hf, "score", None)
    if head is None or backbone is hf:
        raise ValueError(f"{type(hf).__name__}: cannot find the backbone / head (expected .model and .lm_head/.score)")
    return backbone, head
