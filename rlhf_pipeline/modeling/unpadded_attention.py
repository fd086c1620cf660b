"""Attention for shared-prefix pair batches: the model runs on the real tokens only; attention alone is padded.

A shared-prefix batch (shared_prefix.py) has rows of different lengths: with the beer pairs, 4 per batch, about
a fifth of the positions are padding. Embeddings, projections, MLPs, norms and RoPE are per token and need no
padding at all, so `shared_prefix_hidden` feeds the model the N real tokens as one [1, N] sequence, and this
attention function (registered with transformers' AttentionInterface as `UNPADDED`) scatters q/k/v into the
padded [rows, L] layout, attends there under the batch's 4-D mask, and gathers the N outputs back. Without the
batch's `token_slots` it is plain sdpa, so every other forward (padded evaluation rows, generation) is unchanged.

The padded attention is sdpa; a CPU recipe can give the attention layers a faster kernel for it
(`rlhf_pipeline.cpu`, batched-matmul attention). Results equal the padded layout up to float rounding (tests).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

UNPADDED = "rlhf_unpadded"


def _padded_attention(module, query, key, value, mask, dropout, scaling, **kwargs) -> torch.Tensor:
    """[R, L, Hq, D] over the padded rows: sdpa, or the kernel a CPU speed-up set on the layer
    (`rlhf_pipeline.cpu`: batched-matmul attention)."""
    kernel = getattr(module, "rlhf_padded_kernel", None)
    if kernel is not None:
        return kernel(module, query, key, value, mask, dropout, scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)[0]


def unpadded_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, token_slots=None, **kwargs
):
    """transformers attention function: the unpadded path for a batch with `token_slots`, sdpa for any other.

    query [1, Hq, N, D], key/value [1, Hkv, N, D] over the N real tokens; attention_mask [rows, 1, L, L] of the
    padded layout; token_slots [N] flat index (row * L + column) of each real token. Returns [1, N, Hq, D].
    """
    if token_slots is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, width = attention_mask.shape[0], attention_mask.shape[-1]

    def to_padded(x):  # [1, h, N, D] -> [rows, h, L, D]; padding is zero and attends only to itself
        heads, dim = x.shape[1], x.shape[3]
        flat = x[0].transpose(0, 1).reshape(-1, heads * dim)  # [N, h * D]
        padded = flat.new_zeros(rows * width, heads * dim).index_copy(0, token_slots, flat)
        return padded.view(rows, width, heads, dim).transpose(1, 2)

    out = _padded_attention(
        module, to_padded(query), to_padded(key), to_padded(value), attention_mask, dropout, scaling, **kwargs
    )  # [rows, L, Hq, D]
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


SHARED_PREFIX_ATTENTION = ("sdpa", "eager", UNPADDED)


def has_sliding_window(model) -> bool:
    """Whether some attention layer of `model` (plain or peft-wrapped) sees only a window of recent keys: Mistral's
    `sliding_window`, Gemma 2/3's and Qwen2's (with use_sliding_window) "sliding_attention" layer types."""
    config = getattr(model, "config", None)
    if not getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return bool(getattr(config, "use_sliding_window", True))


def supports_shared_prefix(model) -> bool:
    """Whether `model` (plain or peft-wrapped) can take a shared-prefix batch: an attention implementation that takes
    a custom 4-D mask, and no sliding-window layers (transformers applies a custom 4-D mask as is to every layer,
    so the window would be lost and tokens further back than it would be attended: wrong scores)."""
    return attn_implementation(model) in SHARED_PREFIX_ATTENTION and not has_sliding_window(model)


def enable_shared_prefix(model) -> bool:
    """supports_shared_prefix(model), after switching an sdpa model to the unpadded attention (call before peft
    wraps the model); a model with sliding-window layers is left as it is (the stages use two rows per pair)."""
    if has_sliding_window(model):
        return False
    use_unpadded_attention(model)
    return supports_shared_prefix(model)
