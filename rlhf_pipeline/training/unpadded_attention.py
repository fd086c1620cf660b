"""Attention for shared-prefix pair batches: the model runs on the real tokens only; attention alone is padded.

A shared-prefix batch (shared_prefix.py) has rows of different lengths: with the beer pairs, 4 per batch, about
a fifth of the positions are padding. Embeddings, projections, MLPs, norms and RoPE are per token and need no
padding at all, so `shared_prefix_hidden` feeds the model the N real tokens as one [1, N] sequence, and this
attention function (registered with transformers' AttentionInterface as `UNPADDED`) scatters q/k/v into the
padded [rows, L] layout, attends there under the batch's 4-D mask, and gathers the N outputs back. Without the
batch's `token_slots` it is plain sdpa, so every other forward (padded evaluation rows, generation) is unchanged.

On the CPU the padded attention itself is computed with batched matmuls (`math_attention`), not sdpa's flash
kernel: that kernel's backward issues five small GEMMs per (row, head, 64-query block), and at these lengths the
per-call overhead dominates -- its backward costs about as much at L=128 as the math form at L=256 (bf16,
2 threads; bench/ and docs/benchmarks.md have the step-level figures). The math form keeps the probabilities for
backward (rows x heads x L x L), so it is used only up to `MATH_ATTENTION_MAX_SCORES` elements per layer;
longer batches, and every GPU, use sdpa. Both are exact attention; results equal the padded layout up to float
rounding (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlhf_pipeline.training.fused_ops import fused, masked_softmax

UNPADDED = "rlhf_unpadded"
# Largest rows x heads x L x L computed the math way: 64 MiB of bf16 probabilities kept per layer for backward
# (a batch of 4 beer pairs at max length 512 needs about 6 MiB); beyond it, sdpa's O(L) memory wins.
MATH_ATTENTION_MAX_SCORES = 32 * 2**20


def math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scaling: float, dropout: float = 0.0) -> torch.Tensor:
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


def _padded_attention(module, query, key, value, mask, dropout, scaling, **kwargs) -> torch.Tensor:
    """[R, L, Hq, D]: math on the CPU while the scores stay small, sdpa otherwise."""
    rows, heads, length = query.shape[:3]
    if query.device.type == "cpu" and rows * heads * length * length <= MATH_ATTENTION_MAX_SCORES:
        return math_attention(query, key, value, mask, scaling, dropout)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)[0]


def unpadded_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, token_slots=None,
                       **kwargs):
    """transformers attention function: the unpadded path for a batch with `token_slots`, sdpa for any other.

    query [1, Hq, N, D], key/value [1, Hkv, N, D] over the N real tokens; attention_mask [rows, 1, L, L] of the
    padded layout; token_slots [N] flat index (row * L + column) of each real token. Returns [1, N, Hq, D].
    """
    if token_slots is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, width = attention_mask.shape[0], attention_mask.shape[-1]

    def to_padded(x):  # [1, h, N, D] -> [rows, h, L, D]; padding is zero and attends only to itself
        heads, dim = x.shape[1], x.shape[3]
        flat = x[0].transpose(0, 1).reshape(-1, heads * dim)  # [N, h * D]
        padded = flat.new_zeros(rows * width, heads * dim).index_copy(0, token_slots, flat)
        return padded.view(rows, width, heads, dim).transpose(1, 2)

    out = _padded_attention(module, to_padded(query), to_padded(key), to_padded(value), attention_mask, dropout,
                            scaling, **kwargs)  # [rows, L, Hq, D]
    out = out.reshape(rows * width, -1).index_select(0, token_slots)  # [N, Hq * D]
    return out.view(1, -1, query.shape[1], query.shape[3]), None


# Registered once under our own name; the stock "sdpa" entry stays untouched for every other model.
AttentionInterface.register(UNPADDED, unpadded_attention)
AttentionMaskInterface.register(UNPADDED, sdpa_mask)  # masks built as for sdpa when no 4-D mask is given


def attn_implementation(model) -> str | None:
    """The attention implementation a (plain or peft-wrapped) model runs."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def use_unpadded_attention(model) -> bool:
    """Switch an sdpa model to `UNPADDED` (before peft wraps it); True if it runs UNPADDED afterwards. The name is
    not saved with the config, so merged models load as plain sdpa."""
    if attn_implementation(model) == "sdpa":
        model.set_attn_implementation(UNPADDED)
    return attn_implementation(model) == UNPADDED
