"""Tiny random-init models with the real SmolLM2 tokenizer, for tests and smoke runs.

Same architecture family (Llama) and vocabulary as the embedded default, so every code path (tokenization,
EOS/pad handling, LoRA target modules, the sequence-classification head) is exercised, at a size that trains
in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline.modeling.loading import ensure_embedded_model


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a random-init LlamaForCausalLM (about 3M parameters, mostly embeddings) plus tokenizer to out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(ensure_embedded_model())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
