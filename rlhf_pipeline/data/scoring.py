"""Answer scores as in Askell et al. 2021 ("A General Language Assistant...") and StackLLaMA.

    score = round(log2(1 + upvotes)) + (1 if the asker accepted the answer)
    score = -1 if upvotes < 0 (accepted or not: the paper's parenthetical overrides the formula)

`upvotes` is the dump's `Score` attribute (up minus down votes), as in StackLLaMA and the
HuggingFaceH4/stack-exchange-preferences `pm_score`.

Rounding: the tie question (banker's `round()` vs half-up) never arises, because log2 of a positive
integer is never exactly k + 1/2 (that would need 1 + upvotes = 2**k * sqrt(2), which is irrational).
We still avoid floats altogether, so the result cannot depend on libm precision for huge vote counts:
round(log2(m)) == k  <=>  2**(2k-1) <= m**2 < 2**(2k+1)  <=>  k == (bit_length(2*m*m) - 1) // 2.
"""

from __future__ import annotations


def rounded_log2(m: int) -> int:
    """round(log2(m)) for an integer m >= 1, exactly (integer arithmetic only)."""
    if m < 1:
        raise ValueError(f"rounded_log2 needs m >= 1, got {m}")
    return ((2 * m * m).bit_length() - 1) // 2


def askell_score(upvotes: int, accepted: bool) -> int:
    """Preference score of one answer from its net votes and whether the asker accepted it."""
    if upvotes < 0:
        return -1
    return rounded_log2(1 + upvotes) + (1 if accepted else 0)
