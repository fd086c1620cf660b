"""Tiny random-init models with the real SmolLM2 tokenizer, for tests and smoke runs.

The default is the embedded model's family (Llama) and vocabulary, so every code path (tokenization, EOS/pad
handling, LoRA target modules, the sequence-classification head) is exercised, at a size that trains in seconds
on a CPU. `tiny_config` also builds Qwen2, Gemma 3 (text) and Mistral configs of the same size and vocabulary, so
the model-family tests run each architecture's own code (Gemma's embedding scaling, sliding-window layers and
final-logit softcapping; Qwen2's q/k/v biases; Mistral's sliding window) with the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline.modeling.loading import ensure_embedded_model

TINY_ARCHITECTURES = ("llama", "qwen2", "gemma3_text", "mistral")


def tiny_tokenizer():
    """The SmolLM2 tokenizer (from the embedded model's cache)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def tiny_config(architecture: str, tokenizer, *, hidden_size: int = 64, layers: int = 2, **overrides):
    """A transformers config of `architecture` (TINY_ARCHITECTURES) sized for tests, with the tokenizer's vocabulary
    and special ids. Gemma 3: one sliding-window layer (window 4) and one full layer, and a final-logit softcap
    low enough (2.0) that it changes random-init logits visibly; overrides win."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "llama":
        config = transformers.LlamaConfig(**{**common, **overrides})
    elif architecture == "qwen2":
        config = transformers.Qwen2Config(**{**common, **overrides})
    elif architecture == "mistral":
        config = transformers.MistralConfig(**{**common, "sliding_window": 8, **overrides})
    elif architecture == "gemma3_text":
        gemma = dict(
            head_dim=hidden_size // 4,
            sliding_window=4,
            final_logit_softcapping=2.0,
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers],
            query_pre_attn_scalar=hidden_size // 4,
        )
        config = transformers.Gemma3TextConfig(**{**common, **gemma, **overrides})
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r} ({', '.join(TINY_ARCHITECTURES)})")
    return config


def build_tiny_model(
    out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2, architecture: str = "llama"
) -> Path:
    """Write a random-init causal LM (about 3M parameters, mostly embeddings) plus tokenizer to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok = tiny_tokenizer()
    config = tiny_config(architecture, tok, hidden_size=hidden_size, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM._model_mapping[type(config)](config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
