"""Preference pairs within one question: (j preferred over k) for answers whose scores differ."""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlhf_pipeline.data.records import Answer


def candidate_pairs(answers: Sequence[Answer]) -> list[tuple[Answer, Answer]]:
    """Every (better, worse) pair of answers with different scores, in a canonical order.

    Answers are taken in answer-id order, so the result does not depend on how the input ordered them.
    The list has at most n(n-1)/2 entries; the largest Stack Overflow threads (a few hundred answers)
    give ~10^5 tuples, which is fine for one question at a time.
    """
    ordered = sorted(answers, key=lambda a: a.answer_id)
    pairs = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if a.score > b.score:
                pairs.append((a, b))
            elif b.score > a.score:
                pairs.append((b, a))
    return pairs


def choose_pairs(
    answers: Sequence[Answer], max_pairs: int, seed: int, question_key: str
) -> list[tuple[Answer, Answer]]:
    """At most `max_pairs` candidate pairs, drawn reproducibly.

    The random generator is seeded from (seed, question_key) alone, so a question gets the same pairs
    whatever else is in the dump and in whatever order questions are processed. `random.Random(str)`
    hashes the string with SHA-512, so this does not depend on PYTHONHASHSEED.
    """
    pairs = candidate_pairs(answers)
    if len(pairs) <= max_pairs:
        return pairs
    rng = random.Random(f"{seed}:{question_key}")
    chosen = sorted(rng.sample(range(len(pairs)), max_pairs))  # keep the canonical order in the output
    return [pairs[i] for i in chosen]
