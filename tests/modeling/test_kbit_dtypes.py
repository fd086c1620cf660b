"""A k-bit base for LoRA: the dtype of each parameter group after our preparation (bitsandbytes' quantizer stubbed,
conftest.py), the residual stream and KV cache staying in bf16; precision and attention choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling import loading
from rlhf_pipeline.training.trainable import trainable_model


def tiny_bf16(model_class=transformers.LlamaForCausalLM, **extra):
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return model_class(config).to(torch.bfloat16)


def lora_cfg(**overrides):
    fields = dict(
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"], quantization="4bit",
        gradient_checkpointing=True, mixed_precision="no", cpu_kernels="off",
    )  # fmt: skip
    return SimpleNamespace(**{**fields, **overrides})


def dtypes_by_group(model) -> dict[str, set[torch.dtype]]:
    groups: dict[str, set[torch.dtype]] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            group = "lora"
        elif "score" in name:  # peft keeps the untrained head as `original_module` next to the trained copy
            group = "score_head_original" if "original_module" in name else "score_head"
        elif "embed_tokens" in name:
            group = "embeddings"
        elif "lm_head" in name:
            group = "lm_head"
        elif "norm" in name:
            group = "norms"
        else:
            group = "quantized"
        groups.setdefault(group, set()).add(param.dtype)
    return groups


def test_kbit_base_keeps_non_quantized_weights_in_bf16_and_trains_lora_in_fp32(quantize_4bit):
    model = trainable_model(quantize_4bit(tiny_bf16()), lora_cfg(), "CAUSAL_LM")
    assert dtypes_by_group(model) == {
        "embeddings": {torch.bfloat16},
        "lm_head": {torch.bfloat16},
        "norms": {torch.bfloat16},
        "quantized": {torch.uint8},
        "lora": {torch.float32},
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the residual stream (and so every activation and the KV cache) stays bf16; LoRA gets fp32 gradients
    model.train()
    ids = torch.randint(1, 300, (2, 6))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert cache.layers[0].keys.dtype == torch.bfloat16


def test_peft_prepare_would_upcast_them_to_fp32(quantize_4bit):
    """What the issue reports, and what the test above would catch: peft's prepare_model_for_kbit_training makes
    the embeddings, LM head and norms fp32, and with them the residual stream."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(quantize_4bit(tiny_bf16()), use_gradient_checkpointing=False)
    groups = dtypes_by_group(model)
    assert groups["embeddings"] == groups["lm_head"] == groups["norms"] == {torch.float32}
    with torch.no_grad():
        hidden = model(input_ids=torch.randint(1, 300, (1, 4)), output_hidden_states=True).hidden_states
    assert hidden[0].dtype == torch.float32


def test_kbit_reward_model_trains_its_score_head_in_fp32(quantize_4bit):
    base = quantize_4bit(tiny_bf16(transformers.LlamaForSequenceClassification, num_labels=1))
    model = trainable_model(base, lora_cfg(), "SEQ_CLS")
    groups = dtypes_by_group(model)
    assert groups["score_head"] == {torch.float32} and groups["lora"] == {torch.float32}
    assert groups["embeddings"] == groups["norms"] == {torch.bfloat16} and groups["quantized"] == {torch.uint8}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)


# --- precision: bf16 only where the GPU computes it natively ---------------------------------------------------


def fake_cuda(monkeypatch, *, bf16: bool, capability=(7, 5)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_auto_precision_is_bf16_only_on_a_gpu_with_native_bf16(monkeypatch):
    assert loading.torch_dtype("auto", "cpu") == torch.float32
    fake_cuda(monkeypatch, bf16=True, capability=(9, 0))
    assert loading.torch_dtype("auto", "cuda") == torch.bfloat16
    assert loading.native_bf16_available()
    fake_cuda(monkeypatch, bf16=False)  # a T4 / V100: emulated bf16 only
    assert loading.torch_dtype("auto", "cuda") == torch.float32
    assert loading.torch_dtype("fp16", "cuda") == torch.float16
    assert not loading.native_bf16_available()


def test_bf16_asked_for_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    fake_cuda(monkeypatch, bf16=False, capability=(7, 0))
    with pytest.raises(UserError, match=r"compute capability 7\.0\) has no native bf16"):
        loading.torch_dtype("bf16", "cuda")


# --- attention implementation -------------------------------------------------------------------------------------


def test_attn_implementation_reaches_the_model(tiny_model_dir):
    eager = loading.load_causal_lm(str(tiny_model_dir), device="cpu", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    default = loading.load_causal_lm(str(tiny_model_dir), device="cpu")
    assert default.config._attn_implementation == "sdpa"


def test_flash_attention_without_its_package_is_one_clear_error(tiny_model_dir, monkeypatch):
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
        loading.load_causal_lm(str(tiny_model_dir), device="cpu", attn_implementation="flash_attention_2")


def test_bitsandbytes_is_pinned_in_the_gpu_extra():
    """The pinned CUDA build must match the pinned torch: an exact pin, never a range."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["optional-dependencies"]["gpu"] if d.startswith("bitsandbytes")]
    assert len(pins) == 1 and "==" in pins[0]
