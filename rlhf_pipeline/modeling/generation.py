"""Sampling responses: `sample_responses` (PPO's rollouts and evaluation) over a small KV-cache decode loop.

Layout of a rollout batch (B sequences):
    input_ids      [B, P + R]   prompts LEFT-padded to a common length P, then R generated tokens
    response_mask  [B, R]       1 up to and including the first EOS, 0 after it (generate pads finished rows)
The prompt padding is outside the response columns and the post-EOS padding is masked, so neither ever enters
the KL, the advantages or the losses.

Why our own loop: PPO and evaluation spend about half their time generating, and for a small model on a CPU
most of a `generate` step is not the model (logits processors, stopping criteria, `torch.multinomial`'s
exponential draw over the whole vocabulary). This loop does per step
exactly: one decoder call on the new token with the cache, the LM head on the last position only, temperature /
top-k / top-p (HF's order and semantics), and inverse-CDF sampling (one uniform number per row, an exact draw
from the filtered distribution). `generate` stays available (`--generation-backend hf`).

    sequences = sample_with_cache(model, query_ids, query_mask, max_new_tokens=48, eos_token_id=[2], ...)
    # [B, P + R]: left-padded prompts, then R <= max_new_tokens tokens; after a row's EOS only pad tokens

EOS is a LIST of ids (`eos_token_ids(model, tokenizer)`: the model's GenerationConfig, e.g. Llama 3's
[128001, 128008, 128009], Gemma 3's [1, 106], plus the tokenizer's): a row stops at the first of ANY of them, and
the response mask ends there. A single int is accepted too. The pad token fills finished rows; when none is
given it is the first EOS id, as `generate` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf_pipeline.batching.padding import pad
from rlhf_pipeline.modeling.forward import position_ids_from_mask, transformer_parts

EosIds = int | Sequence[int]


def eos_id_list(eos_token_id: EosIds | None) -> list[int]:
    """An int, a list or None -> a list of distinct ids in order (None -> [])."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.reshape(-1).tolist()
    if isinstance(eos_token_id, (str, bytes)) or not hasattr(eos_token_id, "__iter__"):
        eos_token_id = [eos_token_id]
    ids = [int(i) for i in eos_token_id]
    return list(dict.fromkeys(ids))


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """The ids that end a response: the model's GenerationConfig eos_token_id (an int or a list: Llama 3 lists
    three, Gemma 3 two), else its config's, then the tokenizer's EOS (our training data ends every answer with it)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = eos_id_list(getattr(getattr(hf, "generation_config", None), "eos_token_id", None))
    if not ids:
        ids = eos_id_list(getattr(getattr(hf, "config", None), "eos_token_id", None))
    ids += eos_id_list(getattr(tokenizer, "eos_token_id", None))
    ids = list(dict.fromkeys(ids))
    if not ids:
        from rlhf_pipeline.errors import UserError

        raise UserError(f"{type(hf).__name__}: no EOS token id in its generation config, config or tokenizer")
    return ids


def default_pad_id(pad_token_id: int | None, eos_ids: list[int]) -> int:
    """The pad id of finished rows: the given one, else the first EOS id (`generate`'s rule)."""
    return pad_token_id if pad_token_id is not None else eos_ids[0]


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """[B, V] -> [B, V] with filtered-out tokens at -inf, in HF's order: temperature, then top-k, then top-p.

    top-k keeps the k largest logits (ties at the k-th value stay, as in HF); top-p keeps the smallest set of most
    likely tokens whose probabilities sum to at least top_p (always at least one token).
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens BEFORE it already reach top_p (so the one that crosses it stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row [B] drawn from softmax(logits) [B, V] by inverse CDF: u ~ U[0, total), pick the first
    token whose cumulative probability exceeds u. A token with probability 0 (-inf logit) is never picked.
    `uniforms` [B] float64 in [0, 1): the draws to use (drawn here from `generator` when None)."""
    probs = torch.softmax(logits.float(), dim=-1).double()
    cdf = probs.cumsum(dim=-1)  # [B, V]; float64 so the last entries still separate tiny probabilities
    if uniforms is None:
        u = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float64, device=logits.device)
    else:
        u = uniforms.to(device=logits.device, dtype=torch.float64).reshape(-1, 1)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return picked.clamp(max=logits.shape[-1] - 1)  # u * total < total, so only float ties could reach V


@torch.no_grad()
def sample_with_cache(
    causal_lm,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: EosIds,
    pad_token_id: int | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Left-padded prompts [B, P] -> sequences [B, P + R] (see the module docstring).

    A row that emitted any EOS id continues with pad tokens; the loop stops when every row has (R < max_new_tokens
    then), as `generate` does. Every EOS id is suppressed for the first `min_new_tokens` tokens. The head is the
    model's own (transformer_parts: its final-logit processing included), on the last position only.
    `uniforms` [B, max_new_tokens]: row b's sampling draw at step t (drawn here, all at once, when None); a row's
    tokens depend only on its own prompt and draws, so a batch sampled in row chunks with the rows of one draw
    tensor gives the same tokens as the whole batch at once.
    """
    decoder, lm_head = transformer_parts(causal_lm)
    eos_ids = eos_id_list(eos_token_id)
    pad_token_id = default_pad_id(pad_token_id, eos_ids)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=query_ids.device)
    mask = query_mask.long()
    position = position_ids_from_mask(mask)  # the same positions as `generate` for the real tokens
    out = decoder(input_ids=query_ids, attention_mask=mask, position_ids=position, use_cache=True)
    cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]  # [B, H]
    next_position = position[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(query_ids.shape[0], dtype=torch.bool, device=query_ids.device)
    if do_sample and uniforms is None:
        uniforms = draw_uniforms(query_ids.shape[0], max_new_tokens, query_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = lm_head(hidden).float()  # [B, V]
        if t < min_new_tokens:
            logits[:, eos] = float("-inf")
        if do_sample:
            filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            token = sample_from_logits(filtered, uniforms=uniforms[:, t])
        else:
            token = logits.argmax(dim=-1)
        token = token.masked_fill(finished, pad_token_id)  # [B]
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or t + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = decoder(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        next_position = next_position + 1
    return torch.cat([query_ids, torch.stack(tokens, dim=1)], dim=1)


def draw_uniforms(rows: int, steps: int, device) -> torch.Tensor:
    """[rows, steps] float64 U[0, 1) draws from the global generator: every sampling draw of a rollout."""
    return torch.rand((rows, steps), dtype=torch.float64, device=device)


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]: prompt mask, then response_mask
    response_start: int  # P
    response_mask: torch.Tensor  # [B, R]
    has_eos: torch.Tensor  # [B] bool: the response ended by itself

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start :]

    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def rows(self, index: slice | torch.Tensor) -> Rollout:
        """The rollout of some rows (a slice or an index tensor), same columns."""
        return Rollout(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_start=self.response_start,
            response_mask=self.response_mask[index],
            has_eos=self.has_eos[index],
        )


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of consecutive row chunks -> the rollout of all rows, laid out as if sampled at once: prompts
    left-padded to the longest prompt, responses right-padded (pad id, mask 0) to the longest response."""
    if len(parts) == 1:
        return parts[0]
    prompt = max(p.response_start for p in parts)
    response = max(p.response_mask.shape[1] for p in parts)
    ids, masks = [], []
    for p in parts:
        left, right = prompt - p.response_start, response - p.response_mask.shape[1]
        ids.append(torch.nn.functional.pad(p.input_ids, (left, right), value=pad_token_id))
        masks.append(torch.nn.functional.pad(p.attention_mask, (left, right), value=0))
    attention_mask = torch.cat(masks)
    return Rollout(
        input_ids=torch.cat(ids),
        attention_mask=attention_mask,
        response_start=prompt,
        response_mask=attention_mask[:, prompt:],
        has_eos=torch.cat([p.has_eos for p in parts]),
    )


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: EosIds) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R] -> (mask [B, R], has_eos [B]). The mask ends at the first of ANY EOS id: that token is a real action
    (the policy chose to stop) and stays in; everything after it is padding. pad == eos for SmolLM2, so the pad id
    alone cannot tell them apart."""
    eos = torch.tensor(eos_id_list(eos_token_id), dtype=torch.long, device=response_ids.device)
    is_eos = torch.isin(response_ids, eos)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before position t
    return (eos_before == 0).long(), is_eos.any(dim=1)


@torch.no_grad()
def sample_responses(
    policy,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: EosIds,
    pad_token_id: int | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    force_length: bool = False,
    backend: str = "cache-loop",
    chunk_size: int | None = None,
) -> Rollout:
    """Step (1) of PPO: sample one response per prompt with the KV cache, left-padded prompts.

    backend "cache-loop" = sampling.sample_with_cache (ours, faster), "hf" = `policy.generate`.
    force_length suppresses EOS until max_new_tokens (StackLLaMA's fixed-length trick; the TRL benchmarks too).
    eos_token_id: one id or a list (`eos_token_ids(model, tokenizer)`); pad_token_id None -> the first EOS id.
    chunk_size: generate at most this many rows at once (the KV cache and the prefill scale with the chunk, not
    the batch), then lay the chunks out as one rollout. With cache-loop the draws of the whole batch are drawn
    first, so the result equals the unchunked one; `generate` draws per call (same distribution, other samples).
    """
    eos_ids = eos_id_list(eos_token_id)
    pad_token_id = default_pad_id(pad_token_id, eos_ids)
    device = next(policy.parameters()).device
    rows = len(prompt_ids)
    chunk = min(chunk_size or rows, rows)
    uniforms = draw_uniforms(rows, max_new_tokens, device) if do_sample and backend == "cache-loop" else None
    parts = []
    for first in range(0, rows, chunk):
        parts.append(
            _sample_chunk(
                policy,
                prompt_ids[first : first + chunk],
                device=device,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                pad_token_id=pad_token_id,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_new_tokens=max_new_tokens if force_length else 0,
                backend=backend,
                uniforms=uniforms[first : first + chunk] if uniforms is not None else None,
            )
        )
    return concat_rollouts(parts, pad_token_id)


def _sample_chunk(
    policy,
    prompt_ids: Sequence[Sequence[int]],
    *,
    device,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_token_id: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    min_new_tokens: int,
    backend: str,
    uniforms: torch.Tensor | None,
) -> Rollout:
    query_ids, query_mask = pad(prompt_ids, pad_token_id, "left", device)
    if backend == "cache-loop":
        sequences = sample_with_cache(
            policy,
            query_ids,
            query_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_token_id,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_new_tokens=min_new_tokens,
            uniforms=uniforms,
        )
    elif backend == "hf":
        gen_kwargs = dict(
            max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_token_id, use_cache=True
        )
        if do_sample:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if min_new_tokens:
            gen_kwargs["min_new_tokens"] = min_new_tokens
        sequences = policy.generate(input_ids=query_ids, attention_mask=query_mask, **gen_kwargs)
    else:
        raise ValueError(f"unknown generation backend {backend!r} (cache-loop or hf)")
    start = query_ids.shape[1]
    response_mask, has_eos = response_mask_from_ids(sequences[:, start:], eos_ids)
    return Rollout(
        input_ids=sequences,
        attention_mask=torch.cat([query_mask, response_mask], dim=1),
        response_start=start,
        response_mask=response_mask,
        has_eos=has_eos,
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The response texts, up to (not including) the EOS."""
    texts = []
    for ids, mask in zip(rollout.response_ids, rollout.response_mask):
        texts.append(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True))
    return texts
