"""evaluation.statistics against hand-computed values: the Wilson interval with ties as half, the Student-t mean
interval, the length-controlled win-rate, best-of-n weights and KL, and the sequence-KL estimator on a toy
distribution whose exact KL is known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhf_pipeline.evaluation.statistics import (
    best_of_n_bound,
    best_of_n_kl,
    best_of_n_weights,
    length_controlled,
    mean_ci,
    outcomes,
    wilson_interval,
    win_rate_ci,
)


def test_ties_count_half_and_the_wilson_interval_matches_the_formula():
    # 7 wins, 2 ties, 1 loss: p = (7 + 2/2) / 10 = 0.8. By hand, z = 1.959964, z^2 = 3.841459:
    # centre = (0.8 + z^2/20) / (1 + z^2/10) = 0.992073 / 1.384146 = 0.716740
    # half   = z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / 1.384146 = z * 0.160011 / 1.384146 = 0.226578
    policy = [2.0] * 7 + [1.0, 1.0] + [0.0]
    sft = [1.0] * 7 + [1.0, 1.0] + [1.0]
    assert outcomes(policy, sft) == [1.0] * 7 + [0.5, 0.5, 0.0]
    ci = win_rate_ci(policy, sft)
    assert ci.value == pytest.approx(0.8)
    assert (ci.low, ci.high) == pytest.approx((0.716740 - 0.226578, 0.716740 + 0.226578), abs=2e-6)


def test_wilson_interval_edges_stay_in_the_unit_interval():
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + 1.959963984540054**2))
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))


def test_mean_interval_is_student_t():
    # mean 2.5, sd sqrt(5/3) = 1.290994, se 0.645497, t(0.975, df=3) = 3.182446 -> half width 2.054260
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert (ci.value, ci.low, ci.high) == pytest.approx((2.5, 2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    assert mean_ci([0.7]).low == mean_ci([0.7]).high == 0.7


def test_length_controlled_win_rate_is_the_fit_at_equal_length():
    # Two length differences only: the logistic fit reproduces each group's win-rate exactly, so at difference 0
    # (the midpoint) it is sigmoid of the mean of the two logits. Longer answers (+10 tokens) win 4 of 5
    # (logit ln 4), shorter ones (-10) 1 of 2 (logit 0): sigmoid(ln 4 / 2) = sigmoid(ln 2) = 2/3, below the
    # raw 5/7 that the longer answers inflate.
    wins = [1, 1, 1, 1, 0, 1, 0]
    diff = [10] * 5 + [-10] * 2
    assert sum(wins) / len(wins) == pytest.approx(5 / 7)
    assert length_controlled(wins, diff) == pytest.approx(2 / 3, abs=1e-6)
    # ties as half: two ties in the shorter group are the same 1/2 there
    assert length_controlled([1, 1, 1, 1, 0, 0.5, 0.5], diff) == pytest.approx(2 / 3, abs=1e-6)


def test_length_controlled_edge_cases():
    assert length_controlled([1, 0, 0.5], [0, 0, 0]) == pytest.approx(0.5)  # equal lengths: the plain rate
    assert length_controlled([1, 0, 1], [5, 5, 5]) is None  # one constant shift: length and quality confounded
    assert length_controlled([1, 1, 1], [5, -3, 2]) is None  # all wins: the fit has no finite optimum


def test_best_of_n_weights_by_hand():
    # two samples, n = 2 draws with replacement: the better one is picked unless both draws are the worse one
    assert best_of_n_weights([0.3, 0.1], 2) == pytest.approx([0.75, 0.25])
    assert best_of_n_kl([0.3, 0.1], 2) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # a tie group shares its mass: F = 1/4, 3/4, 1 -> 1/16, (9 - 1)/16 split in two, 7/16
    assert best_of_n_weights([2.0, 1.0, 1.0, 0.0], 2) == pytest.approx([7 / 16, 4 / 16, 4 / 16, 1 / 16])
    assert best_of_n_weights([2.0, 1.0, 0.0], 1) == pytest.approx([1 / 3] * 3)
    assert best_of_n_kl([2.0, 1.0, 0.0], 1) == pytest.approx(0.0, abs=1e-12)


def test_best_of_n_kl_is_below_the_bound_and_smaller_for_repeated_answers():
    scores = list(np.random.default_rng(0).random(2000))
    for n in (2, 4, 8, 16):  # distinct answers: the estimate approaches the bound from below
        assert best_of_n_bound(n) - 0.01 < best_of_n_kl(scores, n) <= best_of_n_bound(n)
    # half of the 16 samples are one answer (one reward): less room to move mass than 16 distinct answers
    distinct = [float(i) for i in range(16)]
    repeated = [0.5] * 8 + [float(i) for i in range(8)]
    assert best_of_n_kl(repeated, 4) < best_of_n_kl(distinct, 4) - 0.05
    assert best_of_n_kl([1.0] * 16, 16) == 0.0


def test_sequence_kl_estimate_covers_the_exact_kl_of_a_toy_distribution():
    """Sequences of 3 tokens over a 3-token vocabulary from two Markov chains p and q. The exact KL(p || q) is a
    sum over all 27 sequences; the estimator (mean over sequences sampled from p of the summed token log-ratios,
    what evaluate computes on the policy's sampled answers) must agree within its interval."""
    start_p, start_q = np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.4, 0.3])
    trans_p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    trans_q = np.array([[0.4, 0.4, 0.2], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]])

    def log_prob(seq, start, trans):
        return math.log(start[seq[0]]) + sum(math.log(trans[a, b]) for a, b in zip(seq, seq[1:]))

    exact = sum(
        math.exp(log_prob(s, start_p, trans_p)) * (log_prob(s, start_p, trans_p) - log_prob(s, start_q, trans_q))
        for s in itertools.product(range(3), repeat=3)
    )
    rng = np.random.default_rng(0)
    log_ratios = []
    for _ in range(4000):
        seq = [rng.choice(3, p=start_p)]
        for _ in range(2):
            seq.append(rng.choice(3, p=trans_p[seq[-1]]))
        log_ratios.append(log_prob(seq, start_p, trans_p) - log_prob(seq, start_q, trans_q))
    ci = mean_ci(log_ratios)
    assert exact > 0.3  # far enough from 0 that the check means something
    assert ci.low <= exact <= ci.high
    assert ci.high - ci.low < 0.1 * exact
