"""Shared-prefix pair rows: the layout by hand, and equality with the two-row layout on a real (tiny) model."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.batching.shared_prefix import collate_shared_prefix, common_prefix_length, pack_first_fit
from rlhf_pipeline.cpu import math_attention
from rlhf_pipeline.modeling import unpadded_attention
from rlhf_pipeline.modeling.forward import shared_prefix_response_logprobs
from rlhf_pipeline.modeling.unpadded_attention import enable_shared_prefix

PAD = 0


def test_layout_positions_mask_and_indices_by_hand():
    # chosen = 1 2 3 4, rejected = 1 2 5 -> prefix [1 2], chosen rest [3 4], rejected rest [5]
    # second pair: "7 8" vs "9 8" share nothing -> chosen 7 8, rejected 9 8, then one padding column
    expected_ids = [[1, 2, 3, 4, 5], [7, 8, 9, 8, PAD]]
    batch = collate_shared_prefix([([1, 2, 3, 4], [1, 2, 5]), ([7, 8], [9, 8])], PAD)
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 1, 0]]
    # flat last-token indices: chosen ends at col 3 (row 0) and col 1 (row 1); rejected at col 4 and col 3
    assert batch["last_index"].tolist() == [3, 5 + 1, 4, 5 + 3]
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0],  # prefix
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen: prefix + itself
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # rejected: prefix + itself, never chosen
    ]
    assert mask[1] == [
        [1, 0, 0, 0, 0],  # chosen 7 8 (no prefix)
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # rejected 9 8
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding: itself only (an empty row would make sdpa return NaN)
    ]


def test_first_fit_decreasing_by_hand():
    assert pack_first_fit([6, 3, 3], 6) == [[0], [1, 2]]
    assert pack_first_fit([2, 5, 4, 1, 3], 5) == [[1], [2, 3], [4, 0]]
    assert pack_first_fit([4], 4) == [[0]]


def test_short_pairs_share_a_row_without_seeing_each_other():
    # pair 0: 1 2 3 4 5 | 6 (len 6) ; pairs 1 and 2: len 3 each -> one row [pair 1 | pair 2]
    batch = collate_shared_prefix([([1, 2, 3, 4, 5], [1, 2, 3, 4, 6]), ([7, 8], [7, 9]), ([5, 6], [5, 4])], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 5, 6, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 1, 1, 0, 1, 1]]
    assert batch["last_index"].tolist() == [4, 6 + 1, 6 + 4, 5, 6 + 2, 6 + 5]  # chosen 0..2, then rejected 0..2
    assert batch["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],  # pair 1 prefix "7"
        [1, 1, 0, 0, 0, 0],  # pair 1 chosen "8"
        [1, 0, 1, 0, 0, 0],  # pair 1 rejected "9"
        [0, 0, 0, 1, 0, 0],  # pair 2 prefix "5": nothing of pair 1
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 1],
    ]


def test_prefix_is_capped_so_each_side_keeps_its_last_token():
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3, 4]) == 1
    assert common_prefix_length([5], [5, 6]) == 0
    batch = collate_shared_prefix([([1, 2, 3], [1, 2, 3])], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2]]


def test_label_and_predictor_indices_include_response_tokens_inside_the_prefix():
    # chosen = P P A B, rejected = P P A C; responses start at 2 on both sides: "A" is shared but belongs to BOTH
    batch = collate_shared_prefix([([1, 2, 3, 4], [1, 2, 3, 5])], PAD, response_starts=[(2, 2)])
    # layout: [1 2 3 | 4 | 5]
    by_side = {0: [], 1: []}
    for lab, pred, side in zip(
        batch["label_index"].tolist(), batch["predictor_index"].tolist(), batch["label_side"].tolist()
    ):
        by_side[side].append((lab, pred))
    assert by_side[0] == [(2, 1), (3, 2)]  # chosen: A (from col 1), B (from col 2)
    assert by_side[1] == [(2, 1), (4, 2)]  # rejected: A (from col 1), C (from col 2: the prefix, not chosen's B)


PROMPT = "Question: How do I keep hops fresh?\n\nAnswer: "


def _pairs(tok):
    long_prompt, short_prompt = PROMPT, "Q: ok?\n\nA: "
    texts = [
        (long_prompt, "Vacuum seal them and freeze.", "Leave them in the sun."),
        (long_prompt, "Store cold and dark.", "Store cold, dark and sealed, then use them within a year or so."),
        (long_prompt, "Freeze.", "Freeze."),  # identical sides (a tie)
        (short_prompt, "Ice.", "Cold."),
        (short_prompt, "Yes.", "No."),
    ]  # short: packed into shared rows
    eos = [tok.eos_token_id]
    return [(tok(p + a)["input_ids"] + eos, tok(p + b)["input_ids"] + eos) for p, a, b in texts]


# "sdpa" and "eager": padded rows under the 4-D mask; "unpadded": enable_shared_prefix switched the sdpa model to
# unpadded_attention.py on its sdpa kernel; "unpadded-math": with the CPU kernels' batched-matmul attention
# (cpu/math_attention.py); "unpadded-math-limit": that kernel with its size limit at 0 (falls back to sdpa).
ATTENTION_CASES = ["sdpa", "eager", "unpadded", "unpadded-math", "unpadded-math-limit"]


def _load(model_cls, model_dir, case, monkeypatch, **kwargs):
    model = model_cls.from_pretrained(model_dir, attn_implementation="eager" if case == "eager" else "sdpa", **kwargs)
    if case.startswith("unpadded"):
        assert enable_shared_prefix(model)
        assert model.config._attn_implementation == unpadded_attention.UNPADDED
    if case.startswith("unpadded-math"):
        assert math_attention.use_math_attention(model) > 0
    if case == "unpadded-math-limit":
        monkeypatch.setattr(math_attention, "MATH_ATTENTION_MAX_SCORES", 0)
    return model


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_rewards_equal_the_two_row_layout(tiny_model_dir, case, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.batching.padding import collate_pairs
    from rlhf_pipeline.training.reward_scoring import RewardScorer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = _load(AutoModelForSequenceClassification, tiny_model_dir, case, monkeypatch, num_labels=1)
    torch.nn.init.normal_(model.score.weight)
    assert enable_shared_prefix(model)
    scorer = RewardScorer(model).eval()
    pairs = _pairs(tok)
    with torch.no_grad():
        two_rows = scorer(**collate_pairs(pairs, tok.pad_token_id))
        shared = scorer(**collate_pairs(pairs, tok.pad_token_id, shared_prefix=True))
    shared_batch = collate_pairs(pairs, tok.pad_token_id, shared_prefix=True)
    assert shared_batch["input_ids"].shape[0] < len(pairs)  # some pairs were packed together
    assert shared.shape == (2 * len(pairs),)
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, two_rows, atol=1e-5, rtol=1e-5)
    n = len(pairs)
    assert shared[2] == pytest.approx(float(shared[n + 2]), abs=1e-5)  # identical answers score the same


@pytest.mark.parametrize("case", ["sdpa", "unpadded"])
def test_dpo_logprobs_equal_the_two_row_layout_and_gradients_flow(tiny_model_dir, case, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.training.dpo import collate_dpo_pairs, response_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _load(AutoModelForCausalLM, tiny_model_dir, case, monkeypatch)
    starts = [len(tok(PROMPT)["input_ids"])] * 3 + [len(tok("Q: ok?\n\nA: ")["input_ids"])] * 2
    pairs = [(c, start, r, start) for (c, r), start in zip(_pairs(tok), starts)]
    two_rows = collate_dpo_pairs(pairs, tok.pad_token_id)
    shared = collate_dpo_pairs(pairs, tok.pad_token_id, shared_prefix=True)
    assert shared["input_ids"].shape[0] < len(pairs)  # packed
    for average in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(
                response_logps(model, shared, average), response_logps(model, two_rows, average), atol=1e-5, rtol=1e-5
            )
    summed, counts = shared_prefix_response_logprobs(model, shared)
    assert counts.tolist() == [len(c) - s for c, s, _, _ in pairs] + [len(r) - s for _, _, r, s in pairs]
    summed.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unpadded_gradients_equal_the_padded_layout(tiny_model_dir):
    """Same loss, same gradients for every weight, whether the model runs padded rows or only the real tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.batching.padding import collate_pairs, split_chosen_rejected
    from rlhf_pipeline.training.reward_scoring import RewardScorer, pairwise_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = collate_pairs(_pairs(tok), tok.pad_token_id, shared_prefix=True)
    assert len(batch["token_slots"]) < batch["input_ids"].numel()  # the batch has padding to skip
    grads = []
    for unpadded in (False, True):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        if unpadded:
            enable_shared_prefix(model)
        pairwise_loss(*split_chosen_rejected(RewardScorer(model)(**batch))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_math_attention_equals_sdpa_with_grouped_heads_and_a_custom_mask():
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    rows, q_heads, kv_heads, length, dim = 2, 6, 2, 7, 8
    query = torch.randn(rows, q_heads, length, dim, requires_grad=True)
    key = torch.randn(rows, kv_heads, length, dim, requires_grad=True)
    value = torch.randn(rows, kv_heads, length, dim, requires_grad=True)
    mask = torch.rand(rows, 1, length, length) < 0.5
    mask |= torch.eye(length, dtype=torch.bool)  # every query may attend somewhere
    ours = math_attention.math_attention(query, key, value, mask, scaling=0.3)  # [R, L, Hq, D]
    reference = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn_like(ours)
    ours_grads = torch.autograd.grad((ours * weights).sum(), (query, key, value))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (query, key, value))
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b)
    # a query that may see only itself returns its own value exactly
    only_self = torch.eye(length, dtype=torch.bool).expand(rows, 1, length, length)
    out = math_attention.math_attention(query, key, value, only_self, scaling=0.3)
    torch.testing.assert_close(out, repeat_kv(value, 3).transpose(1, 2))


def test_switch_is_not_saved_and_other_forwards_stay_sdpa(tiny_model_dir, tmp_path):
    """The switched model saves as plain sdpa, and its ordinary padded forward equals an unswitched model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    switched = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert enable_shared_prefix(switched)
    batch = tok(["Question: hops?\n\nAnswer: cold", "Q: ok?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(switched(**batch).logits, plain(**batch).logits)
    switched.save_pretrained(tmp_path / "saved")
    assert unpadded_attention.UNPADDED not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
