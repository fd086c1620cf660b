"""Our KV-cache decode loop: filters vs hand-computed values and HF's warpers, exact sampling frequencies, and the
same tokens as `generate` (greedy, left padding, EOS stop, min_new_tokens)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_pipeline.modeling.generation import filter_logits, sample_from_logits, sample_with_cache

INF = float("-inf")


def test_top_k_and_top_p_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert filter_logits(logits, top_k=2).tolist() == [[INF, INF, 3.0, 4.0]]
    assert filter_logits(logits, temperature=2.0).tolist() == [[0.5, 1.0, 1.5, 2.0]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # top_p 0.7: 0.5 (before it: 0) and 0.3 (before it: 0.5 < 0.7) stay; 0.15 has 0.8 before it -> dropped
    kept = torch.isfinite(filter_logits(probs, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(probs, top_p=0.4)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(probs, top_p=0.01)).sum() == 1  # never empty


def test_filters_match_hf_warpers_on_random_logits():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(16, 500) * 3
    ids = torch.zeros(16, 1, dtype=torch.long)
    hf = TopPLogitsWarper(0.9)(ids, TopKLogitsWarper(50)(ids, TemperatureLogitsWarper(0.7)(ids, logits.clone())))
    ours = filter_logits(logits, temperature=0.7, top_k=50, top_p=0.9)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf))
    torch.testing.assert_close(ours[torch.isfinite(ours)], hf[torch.isfinite(hf)])


def test_inverse_cdf_sampling_frequencies_match_the_probabilities():
    probs = [0.5, 0.3, 0.2, 0.0]
    logits = torch.tensor([math.log(p) if p else INF for p in probs]).expand(40_000, 4)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_from_logits(logits, generator), minlength=4).float() / 40_000
    assert counts[3] == 0  # probability 0 is never drawn
    for got, want in zip(counts.tolist(), probs):
        assert abs(got - want) < 0.01  # 40k draws: standard error <= 0.0025


@pytest.fixture(scope="module")
def lm_and_prompts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.batching.padding import pad

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [
        tok(q)["input_ids"]
        for q in (
            "Question: Which hops?\n\nAnswer:",
            "Question: Why?\n\nAnswer:",
            "Question: How long should a lager ferment at 10 C?\n\nAnswer:",
        )
    ]
    return model, tok, pad(prompts, tok.pad_token_id, "left")


def _hf_greedy(model, query, mask, eos, **kw):
    return model.generate(
        input_ids=query,
        attention_mask=mask,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        temperature=None,
        top_p=None,
        top_k=None,
        **kw,
    )


def test_greedy_tokens_equal_generate_with_left_padding(lm_and_prompts):
    model, tok, (query, mask) = lm_and_prompts
    ours = sample_with_cache(
        model,
        query,
        mask,
        max_new_tokens=12,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    hf = _hf_greedy(model, query, mask, tok.eos_token_id, max_new_tokens=12)
    assert ours.shape == (3, query.shape[1] + 12)
    assert torch.equal(ours, hf)


def test_eos_stops_rows_and_min_new_tokens_suppresses_it(lm_and_prompts):
    model, tok, (query, mask) = lm_and_prompts
    eos = tok.eos_token_id
    bonus = torch.zeros(model.config.vocab_size)
    bonus[eos] = 1e4  # EOS dominates every step, for our loop and generate alike
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bonus)
    try:
        stop_now = sample_with_cache(
            model, query, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos, do_sample=False
        )
        assert stop_now[:, query.shape[1] :].tolist() == [[eos]] * 3  # all rows finished -> loop stopped
        delayed = sample_with_cache(
            model, query, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos, do_sample=False, min_new_tokens=3
        )
        response = delayed[:, query.shape[1] :]
        assert response.shape[1] == 4 and (response[:, :3] != eos).all() and (response[:, 3] == eos).all()
        assert torch.equal(delayed, _hf_greedy(model, query, mask, eos, max_new_tokens=8, min_new_tokens=3))
    finally:
        hook.remove()


def test_sampled_rollouts_are_seeded_and_right_length(lm_and_prompts):
    model, tok, (query, mask) = lm_and_prompts

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return sample_with_cache(
            model,
            query,
            mask,
            max_new_tokens=6,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            top_k=20,
            min_new_tokens=6,
        )

    runs = [sample(3), sample(3)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (3, query.shape[1] + 6)
    assert not torch.equal(sample(4), runs[0])


def test_any_listed_eos_id_stops_a_row_and_is_suppressed_by_min_new_tokens(lm_and_prompts):
    """EOS as a list (a GenerationConfig's eos_token_id, e.g. Llama 3's three ids): a second id stops rows just as
    the first does; with the tokenizer's EOS alone the same model runs to max_new_tokens."""
    model, tok, (query, mask) = lm_and_prompts
    other = 5  # not the tokenizer's EOS; made the argmax at every step
    bonus = torch.zeros(model.config.vocab_size)
    bonus[other] = 1e4
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bonus)
    try:
        eos = [tok.eos_token_id, other]
        stopped = sample_with_cache(model, query, mask, max_new_tokens=6, eos_token_id=eos, do_sample=False)
        assert stopped[:, query.shape[1] :].tolist() == [[other]] * 3
        running = sample_with_cache(
            model,
            query,
            mask,
            max_new_tokens=6,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
        )
        assert running.shape[1] == query.shape[1] + 6
        delayed = sample_with_cache(
            model, query, mask, max_new_tokens=6, eos_token_id=eos, do_sample=False, min_new_tokens=2
        )
        assert delayed.shape[1] == query.shape[1] + 3 and (delayed[:, -1] == other).all()
        assert not torch.isin(delayed[:, query.shape[1] : -1], torch.tensor(eos)).any()
        hf = model.generate(
            input_ids=query,
            attention_mask=mask,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=6,
            min_new_tokens=2,
        )
        assert torch.equal(delayed, hf)
    finally:
        hook.remove()
