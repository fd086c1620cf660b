"""The frontier's arithmetic by hand: the piecewise-linear online curve, online vs offline at matched KL, the
best-of-n curve read off fixed samples, and the plot file."""

from __future__ import annotations

import math

import pytest

from rlhf_pipeline.evaluation.best_of_n import best_of_n_curve, sizes
from rlhf_pipeline.evaluation.frontier import curve, interpolate, matched_kl, plot


def test_online_curve_is_interpolated_at_each_offline_kl():
    points = {
        "sft": {"kl": 0.0, "judge_win_rate": 0.5},
        "ppo:step-5": {"kl": 2.0, "judge_win_rate": 0.6},
        "ppo": {"kl": 4.0, "judge_win_rate": 0.7},
        "dpo": {"kl": 3.0, "judge_win_rate": 0.55},
        "dpo:beta-0.01": {"kl": 9.0, "judge_win_rate": 0.8},  # beyond PPO's range: no comparison
    }
    assert curve(points, ("ppo",), "judge_win_rate") == [(0.0, 0.5), (2.0, 0.6), (4.0, 0.7)]
    assert interpolate([(0.0, 0.5), (2.0, 0.6)], 1.0) == pytest.approx(0.55)
    assert interpolate([(0.0, 0.5), (2.0, 0.6)], 2.5) is None
    rows = {r["model"]: r for r in matched_kl(points, "judge_win_rate")}
    assert rows["dpo"]["online"] == pytest.approx(0.65) and rows["dpo"]["delta"] == pytest.approx(0.10)
    assert rows["dpo:beta-0.01"]["online"] is None and rows["dpo:beta-0.01"]["delta"] is None


def test_best_of_n_curve_by_hand(tmp_path):
    # one question, two samples: proxy prefers sample 0; the judge disagrees (sample 1 is better than SFT's answer)
    rows = best_of_n_curve(proxy=[[1.0, 0.0]], judge=[[-1.0, 2.0]], lengths=[[10, 20]], sft_judge=[0.0])
    assert sizes(2) == [1, 2] and sizes(16) == [1, 2, 4, 8, 16] and sizes(6) == [1, 2, 4, 6]
    one, two = rows
    assert (one["reward_mean"], one["judge_reward_mean"], one["judge_win_rate"], one["kl"]) == pytest.approx(
        (0.5, 0.5, 0.5, 0.0)
    )
    # n = 2: sample 0 with probability 3/4
    assert two["reward_mean"] == pytest.approx(0.75)
    assert two["judge_reward_mean"] == pytest.approx(0.75 * -1 + 0.25 * 2)
    assert two["judge_win_rate"] == pytest.approx(0.25) and two["response_length"] == pytest.approx(12.5)
    assert two["judge_reward_gain"] == pytest.approx(-0.25 - 0.0)  # minus SFT's judge score on the same question
    assert two["kl"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert two["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    png = plot(
        {"sft": {"kl": 0.0, "judge_win_rate": 0.5}, "ppo": {"kl": 1.0, "judge_win_rate": 0.6}},
        rows,
        tmp_path / "f.png",
        ("judge_win_rate",),
    )
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_kept_checkpoint_is_the_policy_at_that_step(tiny_model_dir, ppo_stage_with_checkpoints, tmp_path):
    """The materialized checkpoint equals merging the checkpoint's LoRA weights by hand (a PPO-shaped stage dir:
    adapter/ + checkpoints/step-N/trainable.safetensors named `policy.base_model...`), and is not the SFT model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.evaluation.models import checkpoint_policy, kept_checkpoints

    stage, model, lora_at_5 = ppo_stage_with_checkpoints
    [(step, path)] = kept_checkpoints(stage)  # the last one (step 10) is the final policy: not listed
    assert step == 5
    ref = checkpoint_policy("ppo:step-5", path, stage, str(tiny_model_dir), tmp_path / "ckpt5")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in lora_at_5:
                p.copy_(lora_at_5[n])
    expected = model.merge_and_unload()
    got = AutoModelForCausalLM.from_pretrained(ref.path)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    assert torch.allclose(got(ids).logits, expected(ids).logits, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(got(ids).logits, base(ids).logits, atol=1e-3)


def test_best_of_n_gain_is_paired_with_sft_on_its_own_questions():
    """Best-of-n on the first questions only: its mean would mix in how easy those questions are; the gain over
    SFT's answers to the same questions does not (two questions, SFT scored 3 and -1 there)."""
    rows = best_of_n_curve(proxy=[[0.0], [0.0]], judge=[[4.0], [0.0]], lengths=[[5], [5]], sft_judge=[3.0, -1.0])
    assert rows[0]["judge_reward_mean"] == pytest.approx(2.0)
    assert rows[0]["judge_reward_gain"] == pytest.approx(2.0 - 1.0)
