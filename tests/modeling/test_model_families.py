"""Every forward of modeling/ is right for Llama, Qwen2, Gemma 3 (text) and Mistral, not only SmolLM2.

Tiny random-init models of each family with the SmolLM2 tokenizer (modeling/tiny.py). The reference is always the
model's OWN forward (`model(...).logits`, `model.generate`) on the unpadded sequence, so a path that skips the
model's final-logit processing fails: the tiny Gemma 3 has `final_logit_softcapping=2.0`, which moves its
random-init logits by a few 1e-2 (far above the tolerances here), and one sliding-window layer of width 4 (Mistral:
8), shorter than the test sequences.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.batching.padding import pad
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import (
    LOGITS_BUDGET,
    head_logprobs,
    packed_response_logprobs,
    response_forward,
    response_kl,
    sequence_rewards,
    transformer_parts,
)
from rlhf_pipeline.modeling.generation import (
    eos_token_ids,
    response_mask_from_ids,
    sample_responses,
    sample_with_cache,
)
from rlhf_pipeline.modeling.tiny import TINY_ARCHITECTURES, tiny_config, tiny_tokenizer

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# Weights wide enough that greedy decoding of the random-init models does not collapse to one repeated token
# (at the default 0.02 Llama/Qwen2/Mistral emit token 42 forever); Gemma's scaled embeddings need no help, and
# wider weights would saturate its softcap of 2.
INIT_RANGE = {"llama": 0.3, "qwen2": 0.3, "mistral": 0.3, "gemma3_text": 0.02}


def _causal_lm(tok, architecture, seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(architecture, tok, **{"initializer_range": INIT_RANGE[architecture], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM._model_mapping[type(config)](config).eval()


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def lm(request, tok):
    return _causal_lm(tok, request.param)


def _sequences(tok):
    """(prompt ids, response ids) of different lengths; every sequence is longer than Gemma's window of 4."""
    prompts = [
        "Question: Which hops for a pale ale?\n\nAnswer:",
        "Question: Why?\n\nAnswer:",
        "Question: How long should a lager ferment at 10 C?\n\nAnswer:",
    ]
    responses = [" Cascade and Citra, late.", " Yeast.", " Two to three weeks, then lager it cold for a month."]
    return [(tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]) for p, r in zip(prompts, responses)]


@torch.no_grad()
def _own_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own forward on the UNPADDED sequence: [len - 1], log p(ids[t] | ids[:t])."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# (a) training log-probs equal the model's own forward
# --------------------------------------------------------------------------------------------------------------


def test_head_includes_the_models_own_final_logit_processing(lm):
    backbone, head = transformer_parts(lm)
    ids = torch.tensor([[5, 17, 300, 9, 4000, 12, 8]])
    hidden = backbone(input_ids=ids).last_hidden_state
    own = lm(input_ids=ids).logits
    torch.testing.assert_close(head(hidden), own, **TOL)
    if lm.config.model_type == "gemma3_text":  # the bare LM head (the old path) is visibly off: softcapping
        assert (lm.get_output_embeddings()(hidden) - own).abs().max() > 1e-2


def test_response_forward_equals_own_forward_left_padded(lm, tok):
    """PPO's layout: prompts LEFT padded to P, responses in columns P.., post-EOS padding masked."""
    seqs = _sequences(tok)
    query, query_mask = pad([p for p, _ in seqs], tok.pad_token_id, "left")
    responses, response_mask = pad([r for _, r in seqs], tok.pad_token_id, "right")
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    start = query.shape[1]
    with torch.no_grad():
        out = response_forward(lm, ids, mask, start, with_entropy=True)
    assert out.logprobs.shape == responses.shape
    for row, (prompt, response) in enumerate(seqs):
        want = _own_token_logprobs(lm, prompt + response)[len(prompt) - 1 :]  # the response tokens
        torch.testing.assert_close(out.logprobs[row, : len(response)], want, **TOL)
    assert torch.isfinite(out.entropy).all()


def test_packed_response_logprobs_equal_own_forward_right_padded(lm, tok):
    """DPO's layout: prompt + response RIGHT padded, different prompt lengths, label mask on the responses."""
    seqs = _sequences(tok)
    ids, mask = pad([p + r for p, r in seqs], tok.pad_token_id, "right")
    label_mask = torch.zeros_like(mask)
    for row, (p, r) in enumerate(seqs):
        label_mask[row, len(p) : len(p) + len(r)] = 1
    with torch.no_grad():
        summed, counts = packed_response_logprobs(lm, ids, mask, label_mask)
    want = torch.stack([_own_token_logprobs(lm, p + r)[len(p) - 1 :].sum() for p, r in seqs])
    torch.testing.assert_close(summed, want, **TOL)
    assert counts.tolist() == [len(r) for _, r in seqs]


def test_chunked_head_equals_one_block_values_and_gradients(tok):
    """Above the logits budget the head runs in checkpointed row chunks: same log-probs, entropy and gradients."""
    lm = _causal_lm(tok, "gemma3_text")
    backbone, head = transformer_parts(lm)
    ids = torch.tensor([[5, 17, 300, 9, 4000, 12, 8, 99, 1000]])
    labels = ids[0, 1:]
    results = []
    for budget in (LOGITS_BUDGET, 3 * lm.config.vocab_size):  # one block; chunks of 3 rows (8 rows: 3 + 3 + 2)
        lm.zero_grad()
        hidden = backbone(input_ids=ids).last_hidden_state[0, :-1]
        logprobs, entropy = head_logprobs(head, hidden, labels, temperature=0.7, with_entropy=True, budget=budget)
        logprobs.sum().backward()
        results.append((logprobs.detach(), entropy, [p.grad.clone() for p in lm.parameters() if p.grad is not None]))
    (lp1, ent1, grads1), (lp2, ent2, grads2) = results
    torch.testing.assert_close(lp2, lp1, **TOL)
    torch.testing.assert_close(ent2, ent1, **TOL)
    assert len(grads1) == len(grads2) > 0
    for g1, g2 in zip(grads1, grads2):  # summation order differs: compare at the gradient's own scale
        scale = float(g1.abs().max())
        torch.testing.assert_close(g2, g1, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_kl_equals_full_vocabulary_kl(tok, temperature):
    """Evaluation's exact KL in row chunks equals KL of the two models' own log-distributions at the temperature."""
    policy, reference = _causal_lm(tok, "gemma3_text", seed=0), _causal_lm(tok, "gemma3_text", seed=1)
    seqs = _sequences(tok)
    query, query_mask = pad([p for p, _ in seqs], tok.pad_token_id, "left")
    responses, response_mask = pad([r for _, r in seqs], tok.pad_token_id, "right")
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    start = query.shape[1]
    kl, ratio = response_kl(
        policy, reference, ids, mask, start, budget=2 * policy.config.vocab_size, temperature=temperature
    )
    with torch.no_grad():
        logits_p = policy(input_ids=ids, attention_mask=mask).logits[:, start - 1 : -1].float() / temperature
        logits_q = reference(input_ids=ids, attention_mask=mask).logits[:, start - 1 : -1].float() / temperature
        logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    want = (logp.exp() * (logp - logq)).sum(-1)
    real = response_mask.bool()
    torch.testing.assert_close(kl[real], want[real], **TOL)
    taken = responses[:, :, None]
    torch.testing.assert_close(ratio[real], (logp.gather(-1, taken) - logq.gather(-1, taken))[..., 0][real], **TOL)


# --------------------------------------------------------------------------------------------------------------
# (b) our sampler equals generate; (c) the response mask stops at any EOS
# --------------------------------------------------------------------------------------------------------------


def _greedy_generate(model, query, mask, eos, pad_id, **kwargs):
    return model.generate(
        input_ids=query,
        attention_mask=mask,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
        **kwargs,
    )


def _left_padded_prompts(tok):
    return pad([p for p, _ in _sequences(tok)], tok.pad_token_id, "left")


def test_greedy_sampler_equals_generate(lm, tok):
    query, mask = _left_padded_prompts(tok)
    ours = sample_with_cache(
        lm,
        query,
        mask,
        max_new_tokens=10,
        eos_token_id=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    assert ours.shape == (3, query.shape[1] + 10)
    assert torch.equal(ours, _greedy_generate(lm, query, mask, [tok.eos_token_id], tok.pad_token_id, max_new_tokens=10))


def test_greedy_sampler_stops_at_any_of_several_eos_ids_like_generate(lm, tok):
    """A GenerationConfig with several EOS ids (as Llama 3's): picked from the tokens greedy decoding emits, so
    each row stops at a different one, at a different step; pad is not an EOS here."""
    from transformers import GenerationConfig

    query, mask = _left_padded_prompts(tok)
    free = sample_with_cache(lm, query, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0, do_sample=False)
    free = free[:, query.shape[1] :]
    # row 0 stops at its 3rd token (the first id); another row that never emits the first id stops at its 5th
    first = int(free[0, 2])
    other = next(r for r in (1, 2) if first not in free[r].tolist())
    eos = [first, int(free[other, 4])]
    pad_id = next(i for i in range(1, 100) if i not in eos)
    saved = lm.generation_config
    lm.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad_id)
    try:
        _check_several_eos(lm, tok, query, mask, eos, pad_id, other, free[other].tolist().index(eos[1]))
    finally:
        lm.generation_config = saved


def _check_several_eos(lm, tok, query, mask, eos, pad_id, other, other_stop):
    assert eos_token_ids(lm)[:2] == eos
    ours = sample_with_cache(
        lm, query, mask, max_new_tokens=12, eos_token_id=eos_token_ids(lm), pad_token_id=pad_id, do_sample=False
    )
    hf = _greedy_generate(lm, query, mask, eos_token_ids(lm), pad_id, max_new_tokens=12)
    assert torch.equal(ours, hf)
    response = ours[:, query.shape[1] :]
    mask_r, has_eos = response_mask_from_ids(response, eos)
    assert has_eos[0] and has_eos[other]
    assert int(response[other, other_stop]) == eos[1] and mask_r[other].sum() == other_stop + 1  # by the SECOND id
    for row in range(3):
        stops = [t for t in range(response.shape[1]) if int(response[row, t]) in eos]
        if stops:  # the mask ends at the first EOS of EITHER id; everything after it is pad
            assert mask_r[row].tolist() == [1] * (stops[0] + 1) + [0] * (response.shape[1] - stops[0] - 1)
            assert (response[row, stops[0] + 1 :] == pad_id).all()
    # the same through sample_responses (both backends), as PPO and evaluation call it
    prompts = [p for p, _ in _sequences(tok)]
    for backend in ("cache-loop", "hf"):
        rollout = sample_responses(
            lm,
            prompts,
            max_new_tokens=12,
            eos_token_id=eos_token_ids(lm),
            pad_token_id=pad_id,
            do_sample=False,
            backend=backend,
        )
        assert rollout.response_start == query.shape[1]  # (its prompts are padded with pad_id, ours with tok's)
        assert torch.equal(rollout.response_ids, response)
        assert torch.equal(rollout.response_mask, mask_r) and torch.equal(rollout.has_eos, has_eos)
    # min_new_tokens suppresses every listed EOS id
    forced = sample_with_cache(
        lm, query, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad_id, do_sample=False, min_new_tokens=8
    )
    assert (
        forced.shape[1] == query.shape[1] + 8 and not torch.isin(forced[:, query.shape[1] :], torch.tensor(eos)).any()
    )
    assert torch.equal(forced, _greedy_generate(lm, query, mask, eos, pad_id, max_new_tokens=8, min_new_tokens=8))


def test_response_mask_ends_at_the_first_of_any_eos_id():
    eos = [128001, 128008, 128009]
    response = torch.tensor(
        [
            [5, 6, 128009, 128001, 7],  # stops at the third id
            [5, 128001, 6, 7, 8],  # at the first
            [5, 6, 7, 8, 9],  # never
            [128008, 128008, 1, 1, 1],
        ]
    )  # at once
    mask, has_eos = response_mask_from_ids(response, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]
    single, _ = response_mask_from_ids(response, 128009)  # one int still works: row 1 has no 128009
    assert single[1].tolist() == [1] * 5


def test_eos_token_ids_from_the_generation_config_and_tokenizer(tok):
    from transformers import GenerationConfig

    lm = _causal_lm(tok, "llama")
    lm.generation_config = GenerationConfig(eos_token_id=[128001, 128008, 128009])
    assert eos_token_ids(lm) == [128001, 128008, 128009]
    assert eos_token_ids(lm, tok) == [128001, 128008, 128009, tok.eos_token_id]  # our data ends answers with it
    lm.generation_config = GenerationConfig(eos_token_id=7)
    assert eos_token_ids(lm, tok) == [7, tok.eos_token_id]
    lm.generation_config = GenerationConfig()
    assert eos_token_ids(lm, tok) == list(dict.fromkeys([lm.config.eos_token_id, tok.eos_token_id]))


def test_missing_pad_is_the_first_eos_id(tok):
    lm = _causal_lm(tok, "qwen2")
    query, mask = _left_padded_prompts(tok)
    greedy = sample_with_cache(lm, query, mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0, do_sample=False)
    eos = [int(greedy[0, query.shape[1] + 1]), 3]  # row 0 emits it as its 2nd token
    out = sample_with_cache(lm, query, mask, max_new_tokens=6, eos_token_id=eos, do_sample=False)
    row0 = out[0, query.shape[1] :]
    stop = int(torch.isin(row0, torch.tensor(eos)).nonzero()[0])
    assert (row0[stop + 1 :] == eos[0]).all()


# --------------------------------------------------------------------------------------------------------------
# (d) rewards at the last real token
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_reward_at_last_real_token_is_padding_independent(tok, architecture):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(architecture, tok, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    torch.nn.init.normal_(transformer_parts(model)[1].weight)  # a visible score, not ~0
    # row 0 ends with EOS == pad (SmolLM2), the others with an ordinary token: with pad == eos, a right-padded row
    # that ends with EOS gives its pad positions the same hidden state as its last token (same token, same position
    # from the mask, same keys), so only rows NOT ending with EOS expose reading a pad position instead
    texts = [p + r + ([tok.eos_token_id] if row == 0 else []) for row, (p, r) in enumerate(_sequences(tok))]
    with torch.no_grad():
        unpadded = torch.cat(
            [sequence_rewards(model, torch.tensor([t]), torch.ones(1, len(t), dtype=torch.long)) for t in texts]
        )
        left = sequence_rewards(model, *pad(texts, tok.pad_token_id, "left"))
        right = sequence_rewards(model, *pad(texts, tok.pad_token_id, "right"))
        # the reference: the backbone's own last hidden state at the last token of the unpadded sequence
        backbone, score = transformer_parts(model)
        own = torch.stack([score(backbone(input_ids=torch.tensor([t])).last_hidden_state[0, -1])[0] for t in texts])
    torch.testing.assert_close(unpadded, own.float(), **TOL)
    torch.testing.assert_close(left, unpadded, **TOL)
    torch.testing.assert_close(right, unpadded, **TOL)
    assert len(set(unpadded.tolist())) == 3  # three different scores: reading the wrong token would show


# --------------------------------------------------------------------------------------------------------------
# (e) what cannot be handled is refused with one line
# --------------------------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_encoder_decoder_is_refused(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    )
    with pytest.raises(UserError) as excinfo:
        transformer_parts(model)
    assert "encoder-decoder" in _one_line(excinfo)


def test_model_without_backbone_head_split_is_refused():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(UserError) as excinfo:
        transformer_parts(Bare())
    assert "no backbone / head split" in _one_line(excinfo)


def test_unknown_final_logit_processing_is_refused(tok):
    """A family whose forward post-processes its logits in a way FinalLogits does not know (here: x2) cannot
    be reproduced by head(backbone(x)), so it is refused instead of training on the wrong log-probs."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = ScaledLlama(tiny_config("llama", tok)).eval()
    with pytest.raises(UserError) as excinfo:
        transformer_parts(model)
    assert "final-logit processing" in _one_line(excinfo)
    assert model.training is False  # the check restored the modes


def test_verification_restores_training_mode_and_draws_no_random_numbers(tok):
    model = _causal_lm(tok, "gemma3_text", attention_dropout=0.5).train()
    state = torch.random.get_rng_state()
    transformer_parts(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "architecture, window, shared",
    [
        ("llama", None, True),
        ("qwen2", None, True),
        ("gemma3_text", 4, False),
        ("mistral", 8, False),
        ("mistral", None, True),
    ],
)
def test_sliding_window_models_do_not_take_shared_prefix_batches(tok, architecture, window, shared):
    """The shared-prefix layout's custom 4-D mask reaches every layer as is, so a sliding window would be lost
    (measured: Gemma/Mistral with a window of 4 gave DPO log-probs off by 0.5-0.75 nats): such models use two rows."""
    from rlhf_pipeline.modeling.unpadded_attention import UNPADDED, enable_shared_prefix

    model = _causal_lm(
        tok, architecture, **({} if window is None and architecture != "mistral" else {"sliding_window": window})
    )
    assert enable_shared_prefix(model) is shared
    assert (model.config._attn_implementation == UNPADDED) is shared
