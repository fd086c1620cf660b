import math

import pytest

from rlhf_pipeline.data.scoring import askell_score, rounded_log2


@pytest.mark.parametrize(
    "upvotes, accepted, expected",
    [
        (-5, False, -1),  # negative votes: -1
        (-1, True, -1),  # ... even when accepted (the paper's override)
        (0, False, 0),  # log2(1) = 0
        (0, True, 1),
        (1, False, 1),  # log2(2) = 1
        (2, False, 2),  # log2(3) = 1.58 -> 2
        (4, False, 2),  # log2(5) = 2.32 -> 2
        (5, False, 3),  # log2(6) = 2.58 -> 3
        (10, True, 4),  # log2(11) = 3.46 -> 3, +1
        (21, False, 4),  # log2(22) = 4.46 -> 4
        (22, False, 5),  # log2(23) = 4.52 -> 5
        (1000, False, 10),  # log2(1001) = 9.97 -> 10
        (2**40, True, 41),  # large: log2(2**40 + 1) -> 40, +1
    ],
)
def test_askell_score_hand_computed(upvotes, accepted, expected):
    assert askell_score(upvotes, accepted) == expected


def test_exact_rounding_agrees_with_float_round_and_never_meets_a_tie():
    # A tie (log2(m) = k + 0.5) would make banker's and half-up rounding differ; it cannot happen for
    # integers, and the exact integer formula agrees with float rounding wherever floats are precise.
    for m in range(1, 200_000):
        x = math.log2(m)
        assert abs(x - math.floor(x) - 0.5) > 1e-9
        assert rounded_log2(m) == round(x) == math.floor(x + 0.5)


def test_rounding_boundaries_are_at_powers_of_sqrt2():
    for k in range(1, 60):
        boundary = math.isqrt(2 ** (2 * k - 1))  # the largest m with m**2 < 2**(2k-1): still rounds to k-1
        assert rounded_log2(boundary) == k - 1
        assert rounded_log2(boundary + 1) == k


def test_rounded_log2_rejects_zero():
    with pytest.raises(ValueError):
        rounded_log2(0)
