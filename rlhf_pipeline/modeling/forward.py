"""Every forward pass of the library goes through here: decoder once, head only where a prediction is needed.

    response_forward(lm, ids, mask, P)        log-probs (+ values, entropy) of the response columns [B, R]
    packed_response_logprobs(lm, ..., labels) summed response log-probs of right-padded rows [B]
    sequence_rewards(seq_cls, ids, mask)      a reward model's score at each row's LAST REAL token [B]
    shared_prefix_*(model, batch)             the same for a shared-prefix pair batch (batching/shared_prefix.py)

The decoder runs once and the (large) head only at the positions that predict something: with a 49k vocabulary
most of the logits work of a naive forward would go to the prompt and the padding, where nothing needs them.
Positions are derived from the attention mask, so left- and right-padded batches give the scores and log-probs
of the unpadded sequences.

Why the score is read here rather than by `AutoModelForSequenceClassification.forward`: transformers pools at the
last token that is not `pad_token_id`, and older code at the first pad token minus one. Both go wrong when
pad == eos (SmolLM2: both are `<|im_end|>`): our sequences END with a real EOS, which those rules mistake for
padding, so the score would be read one token early. Here the index comes from the attention mask alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhf_pipeline.modeling.unpadded_attention import UNPADDED, attn_implementation


def transformer_parts(model) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a transformers CausalLM / SequenceClassification model, also through a PeftModel.

    The LoRA layers live inside the backbone, so they are active either way.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = hf.base_model  # transformers: the module named by `base_model_prefix` ("model" for Llama)
    head = hf.get_output_embeddings() if hasattr(hf, "lm_head") else getattr(hf, "score", None)
    if head is None or backbone is hf:
        raise ValueError(f"{type(hf).__name__}: cannot find the backbone / head (expected .model and .lm_head/.score)")
    return backbone, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as `generate` computes them (so log-probs match sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: logits [B, T, V], labels [B, T] -> [B, T].

    Gather minus logsumexp instead of log_softmax().gather(): never materializes a second [B, T, V] tensor.
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)

def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): [..., V] -> [...]. H = logsumexp(z) - sum softmax(z) * z."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask == 1 in each row (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def hidden_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, L, H] of padded rows, positions from the mask (skipping left padding as `generate`
    does). use_cache=False: training and scoring never reuse a KV cache."""
    return backbone(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state


def score(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A one-logit score head on pooled states: [N, H] -> [N] fp32 (the head may be fp32 on a bf16 backbone)."""
    return head(pooled.to(next(head.parameters()).dtype)).squeeze(-1).float()


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     head: nn.Module | None = None) -> torch.Tensor:
    """[B] fp32 rewards of a (peft-wrapped or plain) one-logit sequence-classification model, read at each row's
    last real token. `head` replaces the model's own (a reward adapter on a causal LM's base)."""
    backbone, own_head = transformer_parts(model)
    hidden = hidden_states(backbone, input_ids, attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return score(head if head is not None else own_head, hidden[rows, last_token_index(attention_mask)])


@dataclass
class ResponseOutputs:
    logprobs: torch.Tensor  # [B, R] log pi(response token t | prefix)
    values: torch.Tensor | None  # [B, R] V(prefix before token t)
    entropy: torch.Tensor | None  # [B, R] entropy of pi(. | prefix) (no grad)


def response_forward(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, *,
                     value_head: nn.Module | None = None, temperature: float = 1.0,
                     with_entropy: bool = False) -> ResponseOutputs:
    """One decoder pass over prompt + response; log-probs (and values) for the response tokens only.

    input_ids, attention_mask [B, P + R] with the response starting at column P = response_start (prompts left
    padded to a common length). The LM head runs on R positions, not P + R.
    """
    logits, hidden = response_logits(causal_lm, input_ids, attention_mask, response_start)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, input_ids[:, response_start:])
    values = value_head(hidden) if value_head is not None else None
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return ResponseOutputs(logprobs=logprobs, values=values, entropy=entropy)


def response_logits(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [B, R, V], hidden states [B, R, H]) at the R positions that predict the response tokens."""
    decoder, lm_head = transformer_parts(causal_lm)
    hidden = hidden_states(decoder, input_ids, attention_mask)
    hidden = hidden[:, response_start - 1 : -1]  # [B, R, H]: the state at t-1 predicts response token t
    # The head on a 2-D [B*R, H] input: a (non-contiguous) 3-D slice makes torch run a batched matmul that
    # copies the whole [V, H] weight per call (a large share of a CPU forward+backward for a 49k vocabulary).
    batch, length, width = hidden.shape
    logits = lm_head(hidden.reshape(batch * length, width)).float().view(batch, length, -1)
    return logits, hidden


def packed_response_logprobs(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and token-count of response log-probs per row for RIGHT-padded rows with different prompt lengths.

    label_mask [B, L] marks the response tokens (the labels). Only the hidden states that predict them go through
    the LM head ([N, H] -> [N, V], N = response tokens in the batch), never the prompt or the padding.
    Returns (summed logps [B], response token counts [B]).
    """
    decoder, lm_head = transformer_parts(causal_lm)
    hidden = hidden_states(decoder, input_ids, attention_mask)
    predictor = torch.zeros_like(label_mask, dtype=torch.bool)
    predictor[:, :-1] = label_mask[:, 1:].bool()  # the state at t-1 predicts the token at t
    rows = predictor.nonzero(as_tuple=True)[0]  # [N]
    logits = lm_head(hidden[predictor]).float()  # [N, V]
    labels = input_ids[:, 1:][label_mask[:, 1:].bool()]  # [N], same row-major order as hidden[predictor]
    token_logps = logprobs_from_logits(logits, labels)  # [N]
    summed = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    summed = summed.index_add(0, rows, token_logps)
    counts = label_mask[:, 1:].sum(-1).to(summed.dtype)
    return summed, counts


# ------------------------------------------------------------------------------------------------------------
# Shared-prefix pair batches (layout: batching/shared_prefix.py)
# ------------------------------------------------------------------------------------------------------------

def shared_prefix_hidden(backbone, batch: dict) -> torch.Tensor:
    """Last hidden states of a shared-prefix batch, flattened to [B * L, H] (index with the batch's flat indices)."""
    mask = batch["attention_mask"]
    implementation = attn_implementation(backbone)
    if implementation == UNPADDED:
        slots = batch["token_slots"]
        hidden = backbone(input_ids=batch["input_ids"].reshape(1, -1)[:, slots], attention_mask=mask,
                          position_ids=batch["position_ids"].reshape(1, -1)[:, slots], use_cache=False,
                          token_slots=slots).last_hidden_state[0]  # [N, H]
        # back to padded flat positions, so the batch's flat indices apply unchanged
        return hidden.new_zeros(mask.shape[0] * mask.shape[-1], hidden.shape[-1]).index_copy(0, slots, hidden)
    if implementation == "eager":  # eager ADDS the mask to the scores: 0 where allowed, -inf-ish elsewhere
        dtype = next(backbone.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                      use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def shared_prefix_response_logprobs(causal_lm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [2B], response token counts [2B]) of a shared-prefix batch built with
    response starts; chosen 1..B then rejected 1..B. Only the N predicting states go through the LM head."""
    backbone, lm_head = transformer_parts(causal_lm)
    hidden = shared_prefix_hidden(backbone, batch)
    logits = lm_head(hidden[batch["predictor_index"]]).float()  # [N, V]
    token_logps = logprobs_from_logits(logits, batch["input_ids"].reshape(-1)[batch["label_index"]])  # [N]
    sides = batch["last_index"].shape[0]
    summed = torch.zeros(sides, dtype=token_logps.dtype, device=token_logps.device)
    summed = summed.index_add(0, batch["label_side"], token_logps)
    counts = torch.zeros(sides, dtype=token_logps.dtype, device=token_logps.device)
    counts = counts.index_add(0, batch["label_side"], torch.ones_like(token_logps))
    return summed, counts


def shared_prefix_rewards(model: nn.Module, batch: dict) -> torch.Tensor:
    """[2B] fp32 rewards (chosen 1..B, rejected 1..B) of a shared-prefix pair batch."""
    backbone, score_head = transformer_parts(model)
    hidden = shared_prefix_hidden(backbone, batch)
    return score(score_head, hidden[batch["last_index"]])
