"""Shared-prefix pair rows: the layout by hand, and equality with the two-row layout on a real (tiny) model."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.training.shared_prefix import (
    collate_shared_prefix, common_prefix_length, shared_prefix_response_logprobs, supports_shared_prefix,
)

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
    for lab, pred, side in zip(batch["label_index"].tolist(), batch["predictor_index"].tolist(),
                               batch["label_side"].tolist()):
        by_side[side].append((lab, pred))
    assert by_side[0] == [(2, 1), (3, 2)]  # chosen: A (from col 1), B (from col 2)
    assert by_side[1] == [(2, 1), (4, 2)]  # rejected: A (from col 1), C (from col 2: the prefix, not chosen's B)


def _pairs(tok):
    prompt = "Question: How do I keep hops fresh?\n\nAnswer: "
    texts = [("Vacuum seal them and freeze.", "Leave them in the sun."),
             ("Store cold and dark.", "Store cold, dark and sealed, then use them within a year or so."),
             ("Freeze.", "Freeze.")]  # identical sides (a tie)
    eos = [tok.eos_token_id]
    return [(tok(prompt + a)["input_ids"] + eos, tok(prompt + b)["input_ids"] + eos) for a, b in texts]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rewards_equal_the_two_row_layout(tiny_model_dir, attn):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.training.reward_scoring import RewardScorer, collate_pairs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, attn_implementation=attn)
    torch.nn.init.normal_(model.score.weight)
    assert supports_shared_prefix(model)
    scorer = RewardScorer(model).eval()
    pairs = _pairs(tok)
    with torch.no_grad():
        two_rows = scorer(**collate_pairs(pairs, tok.pad_token_id))
        shared = scorer(**collate_pairs(pairs, tok.pad_token_id, shared_prefix=True))
    assert shared.shape == (2 * len(pairs),)
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, two_rows, atol=1e-5, rtol=1e-5)
    assert shared[2] == pytest.approx(float(shared[5]), abs=1e-5)  # identical answers score the same


def test_dpo_logprobs_equal_the_two_row_layout_and_gradients_flow(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.training.dpo import collate_pairs, response_logps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt_len = len(tok("Question: How do I keep hops fresh?\n\nAnswer: ")["input_ids"])
    pairs = [(c, prompt_len, r, prompt_len) for c, r in _pairs(tok)]
    two_rows = collate_pairs(pairs, tok.pad_token_id)
    shared = collate_pairs(pairs, tok.pad_token_id, shared_prefix=True)
    for average in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(response_logps(model, shared, average), response_logps(model, two_rows, average),
                                       atol=1e-5, rtol=1e-5)
    summed, counts = shared_prefix_response_logprobs(model, shared)
    assert counts.tolist() == [len(c) - prompt_len for c, _, _, _ in pairs] + [len(r) - prompt_len for _, _, r, _ in pairs]
    summed.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
