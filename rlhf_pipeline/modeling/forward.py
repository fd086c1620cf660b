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

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.unpadded_attention import UNPADDED, attn_implementation


def unwrap(model) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformer_parts(model) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a transformers CausalLM / SequenceClassification model, also through a PeftModel.

    A causal LM's head is its LM head followed by the model's own final-logit processing (`FinalLogits`: Gemma 2/3's
    `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`), so head(backbone(x)) gives
    the logits of the model's own forward; that is checked once per model against the model's own forward
    (`verify_logits`), and a model whose logits we cannot reproduce is refused. Embedding scaling (Gemma) and
    everything else before the last norm is in the backbone. The LoRA layers live inside the backbone, so they
    are active either way. Unsupported architectures raise one UserError line.
    """
    hf = unwrap(model)
    name = type(hf).__name__
    config = getattr(hf, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{name}: encoder-decoder models are not supported (decoder-only causal LMs only)")
    backbone = getattr(hf, "base_model", None)  # transformers: the module named by `base_model_prefix`
    if hasattr(hf, "lm_head"):
        head = hf.get_output_embeddings()
        causal = True
    else:
        head, causal = getattr(hf, "score", None), False
    if not isinstance(backbone, nn.Module) or backbone is hf or not isinstance(head, nn.Module):
        raise UserError(
            f"{name}: unsupported architecture: no backbone / head split (expected .model and "
            ".lm_head or .score, as transformers' decoder-only models have)"
        )
    if causal:
        head = FinalLogits.wrap(hf, head)
        verify_logits(hf, backbone, head)
    return backbone, head


class FinalLogits(nn.Module):
    """The LM head plus the model's own final-logit processing, in the order and dtype its forward applies it."""

    def __init__(self, lm_head: nn.Module, *, softcap: float | None = None, scale: float | None = None):
        super().__init__()
        self.lm_head, self.softcap, self.scale = lm_head, softcap, scale
        self.out_features = getattr(lm_head, "out_features", None)

    @classmethod
    def wrap(cls, hf: nn.Module, lm_head: nn.Module) -> nn.Module:
        """lm_head itself when the model applies no processing, else a FinalLogits around it."""
        config = hf.config
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3/3n, VaultGemma: tanh(z / c) * c
        scale = getattr(hf, "logit_scale", None)  # Cohere: z * logit_scale
        if not isinstance(scale, (int, float)):
            scale = None
        scaling = getattr(config, "logits_scaling", None)  # Granite: z / logits_scaling
        if isinstance(scaling, (int, float)) and scaling != 1:
            scale = (scale or 1.0) / scaling
        if not softcap and scale in (None, 1):
            return lm_head
        return cls(lm_head, softcap=softcap or None, scale=scale if scale not in (None, 1) else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


_VERIFIED = "_rlhf_logits_verified"


def verify_logits(hf: nn.Module, backbone: nn.Module, head: nn.Module) -> None:
    """Once per model: head(backbone(x)) must equal the model's own forward logits on a few tokens, else UserError.

    This is what keeps an unknown family's final-logit processing (one FinalLogits does not know) from silently
    changing our log-probs. Runs in eval mode under no_grad (no dropout, no RNG draws), the modes restored after.
    """
    if hf.__dict__.get(_VERIFIED):
        return
    name = type(hf).__name__
    embeddings = hf.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else next(hf.parameters()).device
    vocab = getattr(hf.config, "vocab_size", None) or 8
    ids = (torch.arange(5, device=device) * 7 + 1).remainder(vocab).unsqueeze(0)  # [1, 5] arbitrary real ids
    mask = torch.ones_like(ids)
    modes = [(m, m.training) for m in hf.modules()]
    hf.eval()
    try:
        with torch.no_grad():
            try:
                own = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
            except Exception as exc:  # a forward that does not take these inputs: not a model we can drive
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                raise UserError(
                    f"{name}: unsupported architecture: its forward failed on a plain causal-LM "
                    f"input ({type(exc).__name__}: {first_line})"
                ) from None
            ours = head(hidden_states(backbone, ids, mask))
    finally:
        for module, training in modes:
            module.training = training
    own, ours = own.float(), ours.float()
    if not torch.isfinite(own).all():  # NaN/inf weights: no tolerance to compare with, and nothing to train
        raise UserError(f"{name}: the model's logits are not finite (NaN or inf in its weights)")
    tolerance = 1e-3 * (1.0 + own.abs().max().item())
    if own.shape != ours.shape or not torch.allclose(ours, own, rtol=1e-3, atol=tolerance):
        raise UserError(
            f"{name}: unsupported architecture: its forward applies final-logit processing this "
            "library does not reproduce (LM head on the last hidden state differs from its logits)"
        )
    hf.__dict__[_VERIFIED] = True


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
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def score(head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """A one-logit score head on pooled states: [N, H] -> [N] fp32 (the head may be fp32 on a bf16 backbone)."""
    return head(pooled.to(next(head.parameters()).dtype)).squeeze(-1).float()


def sequence_rewards(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, head: nn.Module | None = None
) -> torch.Tensor:
    """[B] fp32 rewards of a (peft-wrapped or plain) one-logit sequence-classification model, read at each row's
    last real token. `head` replaces the model's own (a reward adapter on a causal LM's base)."""
    backbone, own_head = transformer_parts(model)
    hidden = hidden_states(backbone, input_ids, attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return score(head if head is not None else own_head, hidden[rows, last_token_index(attention_mask)])


# Largest [rows, V] block of fp32 logits computed at once (64 Mi elements = 256 MiB). SmolLM2's 49k vocabulary
# reaches it at about 1,300 predicted tokens, Gemma 3's 262k at 256: larger batches go through the head in row
# chunks, and with autograd each chunk is checkpointed (its logits recomputed in backward) so only one chunk's
# logits are alive at a time, not N x V of them.
LOGITS_BUDGET = 1 << 26


def _vocab_size(head: nn.Module) -> int | None:
    size = getattr(head, "out_features", None)
    if size is None and isinstance(getattr(head, "weight", None), torch.Tensor):
        size = head.weight.shape[0]
    return size


def _head_logprobs_block(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, labels)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def head_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(label | state) (and the entropy, no grad) of N predicting states: hidden [N, H], labels [N] -> [N].

    The head runs on a 2-D input: a (non-contiguous) 3-D slice makes torch run a batched matmul that copies the
    whole [V, H] weight per call. Above `budget` logits elements the rows go in chunks (see LOGITS_BUDGET).
    """
    budget = LOGITS_BUDGET if budget is None else budget
    vocab = _vocab_size(head)
    rows = hidden.shape[0]
    if vocab is None or rows * vocab <= budget:
        return _head_logprobs_block(head, hidden, labels, temperature, with_entropy)
    step = max(1, budget // vocab)
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropies = [], []
    for start in range(0, rows, step):
        h, y = hidden[start : start + step], labels[start : start + step]
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_head_logprobs_block, head, h, y, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _head_logprobs_block(head, h, y, temperature, with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs), (torch.cat(entropies) if with_entropy else None)


@dataclass
class ResponseOutputs:
    logprobs: torch.Tensor  # [B, R] log pi(response token t | prefix)
    values: torch.Tensor | None  # [B, R] V(prefix before token t)
    entropy: torch.Tensor | None  # [B, R] entropy of pi(. | prefix) (no grad)


def response_hidden(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> tuple[torch.Tensor, nn.Module]:
    """(hidden states [B, R, H] at the R positions that predict the response tokens, the model's head)."""
    decoder, lm_head = transformer_parts(causal_lm)
    hidden = hidden_states(decoder, input_ids, attention_mask)
    return hidden[:, response_start - 1 : -1], lm_head  # the state at t-1 predicts response token t


def response_forward(
    causal_lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    *,
    value_head: nn.Module | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> ResponseOutputs:
    """One decoder pass over prompt + response; log-probs (and values) for the response tokens only.

    input_ids, attention_mask [B, P + R] with the response starting at column P = response_start (prompts left
    padded to a common length). The LM head runs on R positions, not P + R.
    """
    hidden, lm_head = response_hidden(causal_lm, input_ids, attention_mask, response_start)
    batch, length, width = hidden.shape
    logprobs, entropy = head_logprobs(
        lm_head,
        hidden.reshape(batch * length, width),
        input_ids[:, response_start:].reshape(-1),
        temperature=temperature,
        with_entropy=with_entropy,
    )
    values = value_head(hidden) if value_head is not None else None
    return ResponseOutputs(
        logprobs=logprobs.view(batch, length),
        values=values,
        entropy=entropy.view(batch, length) if entropy is not None else None,
    )


@torch.no_grad()
def response_kl(
    policy,
    reference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    *,
    budget: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position [B, R]: (exact KL(pi(.|prefix) || pi_ref(.|prefix)) over the whole vocabulary,
    log pi(y_t) - log pi_ref(y_t)). Both heads run on the same row chunks, so at most two chunks of logits exist
    at a time rather than two [B, R, V] tensors. `temperature`: both distributions are softmax(logits / T), the
    ones answers sampled at T come from and PPO's KL penalty compares at its --temperature."""
    hp, head_p = response_hidden(policy, input_ids, attention_mask, response_start)
    hq, head_q = response_hidden(reference, input_ids, attention_mask, response_start)
    batch, length, width = hp.shape
    hp, hq = hp.reshape(-1, width), hq.reshape(-1, hq.shape[-1])
    taken = input_ids[:, response_start:].reshape(-1, 1)
    vocab = _vocab_size(head_p) or 1
    step = max(1, (LOGITS_BUDGET if budget is None else budget) // vocab)
    kls, ratios = [], []
    for start in range(0, hp.shape[0], step):
        rows = slice(start, start + step)
        logp = (head_p(hp[rows]).float() / temperature).log_softmax(-1)
        logq = (head_q(hq[rows]).float() / temperature).log_softmax(-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
        ratios.append((logp.gather(-1, taken[rows]) - logq.gather(-1, taken[rows])).squeeze(-1))
    return torch.cat(kls).view(batch, length), torch.cat(ratios).view(batch, length)


def packed_response_logprobs(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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
    labels = input_ids[:, 1:][label_mask[:, 1:].bool()]  # [N], same row-major order as hidden[predictor]
    token_logps, _ = head_logprobs(lm_head, hidden[predictor], labels)  # [N]
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
        hidden = backbone(
            input_ids=batch["input_ids"].reshape(1, -1)[:, slots],
            attention_mask=mask,
            position_ids=batch["position_ids"].reshape(1, -1)[:, slots],
            use_cache=False,
            token_slots=slots,
        ).last_hidden_state[0]  # [N, H]
        # back to padded flat positions, so the batch's flat indices apply unchanged
        return hidden.new_zeros(mask.shape[0] * mask.shape[-1], hidden.shape[-1]).index_copy(0, slots, hidden)
    if implementation == "eager":  # eager ADDS the mask to the scores: 0 where allowed, -inf-ish elsewhere
        dtype = next(backbone.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def shared_prefix_response_logprobs(causal_lm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [2B], response token counts [2B]) of a shared-prefix batch built with
    response starts; chosen 1..B then rejected 1..B. Only the N predicting states go through the LM head."""
    backbone, lm_head = transformer_parts(causal_lm)
    hidden = shared_prefix_hidden(backbone, batch)
    token_logps, _ = head_logprobs(
        lm_head, hidden[batch["predictor_index"]], batch["input_ids"].reshape(-1)[batch["label_index"]]
    )  # [N]
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
