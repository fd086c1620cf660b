"""Assign each question to one subset (finetune / reward / rl / evaluation), deterministically.

The subset is a function of (seed, qid) only: a hash mapped to [0, 1) and cut by the cumulative
fractions. So subsets are disjoint by question, and a question keeps its subset when the dump grows
(new questions never move old ones). Caps are applied in input order, which for a dump is post-id
order: a grown dump keeps the earlier questions in a capped subset.
"""

from __future__ import annotations

import hashlib

from rlhf_pipeline.data.config import ALL_SUBSETS, PrepareDataConfig


def unit_interval_hash(seed: int, qid: str) -> float:
    """A uniform-looking number in [0, 1) from (seed, qid); stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SubsetAssigner:
    def __init__(self, cfg: PrepareDataConfig):
        self.seed = cfg.seed
        self.bounds: list[tuple[float, str]] = []
        upper = 0.0
        for subset in ALL_SUBSETS:
            if cfg.fraction(subset) > 0:
                upper += cfg.fraction(subset)
                self.bounds.append((upper, subset))
        self.max_questions = {s: cfg.max_questions(s) for s in ALL_SUBSETS}
        self.max_pairs = {s: cfg.max_pairs(s) for s in ALL_SUBSETS}
        self.questions = dict.fromkeys(ALL_SUBSETS, 0)
        self.pairs = dict.fromkeys(ALL_SUBSETS, 0)

    def subset_of(self, qid: str) -> str | None:
        """The subset this question belongs to, or None if the fractions add up to less than 1."""
        u = unit_interval_hash(self.seed, qid)
        for upper, subset in self.bounds:
            if u < upper:
                return subset
        return None

    def is_full(self, subset: str) -> bool:
        q_cap, p_cap = self.max_questions[subset], self.max_pairs[subset]
        return (q_cap is not None and self.questions[subset] >= q_cap) or (
            p_cap is not None and self.pairs[subset] >= p_cap
        )

    def pair_room(self, subset: str) -> int | None:
        """How many more pairs the subset may take (None: no cap)."""
        cap = self.max_pairs[subset]
        return None if cap is None else cap - self.pairs[subset]

    def record(self, subset: str, n_pairs: int) -> None:
        self.questions[subset] += 1
        self.pairs[subset] += n_pairs
