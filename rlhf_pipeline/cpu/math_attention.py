"""Batched-matmul ("math") attention for the padded rows of the unpadded pair layout, on the CPU.

sdpa's CPU flash kernel issues five small GEMMs per (row, head, 64-query block) in its backward, and at pair
lengths the per-call overhead dominates: its backward costs about as much at L=128 as the math form at L=256
(bf16, 2 threads; docs/benchmarks.md). The math form keeps the probabilities for backward (rows x heads x L x L),
so it is used only up to `MATH_ATTENTION_MAX_SCORES` elements per layer; longer batches fall back to sdpa.
Both are exact attention; results equal sdpa up to float rounding (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlhf_pipeline.cpu.fused_ops import fused, masked_softmax

# Largest rows x heads x L x L computed the math way: 64 MiB of bf16 probabilities kept per layer for backward
# (a batch of 4 beer pairs at max length 512 needs about 6 MiB); beyond it, sdpa's O(L) memory wins.
MATH_ATTENTION_MAX_SCORES = 32 * 2**20


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v with batched matmuls; grouped-query heads without copying k/v.

    query [R, Hq, L, D], key/value [R, Hkv, L, D], mask [R, 1, L, L] bool (True = may attend; no row may be all
    False). Returns [R, L, Hq, D], the layout transformers' attention functions return.
    """
    rows, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads  # query head h reads kv head h // groups (transformers' repeat_kv order)
    grouped = (query * scaling).reshape(rows, kv_heads, groups * length, dim)  # scale the small tensor, not scores
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(rows, kv_heads, groups, length, length)
    bias = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    bias.masked_fill_(~mask, torch.finfo(scores.dtype).min)  # [R, 1, L, L]; finite, so no NaN from a -inf row
    probs = fused(masked_softmax)(scores, bias.unsqueeze(1))  # eager: the CPU softmax accumulates bf16 in fp32
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(rows, kv_heads, groups * length, length), value)  # [R, Hkv, g * L, D]
    return out.view(rows, q_heads, length, dim).transpose(1, 2)


def padded_math_attention(module, query, key, value, mask, dropout, scaling, **kwargs) -> torch.Tensor:
    """The unpadded layout's padded kernel ([R, L, Hq, D]): math on the CPU while the scores stay small."""
    rows, heads, length = query.shape[:3]
    if query.device.type == "cpu" and rows * heads * length * length <= MATH_ATTENTION_MAX_SCORES:
        return math_attention(query, key, value, mask, scaling, dropout)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)[0]


def use_math_attention(model: torch.nn.Module) -> int:
    """Give every attention layer of `model` the math kernel for unpadded batches; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            module.rlhf_padded_kernel = padded_math_attention
            count += 1
    return count
