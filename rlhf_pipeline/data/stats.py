"""Counters that end up in stats.json: what was read, and every skip with its reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rlhf_pipeline.data.config import JUDGE, SUBSETS

# Every reason is always present in stats.json (0 when it did not happen), so consumers can rely on the keys.
ROW_SKIP_REASONS = (
    "missing_id",  # no Id attribute (or qid in a preference file)
    "missing_post_type",
    "missing_score",  # answer without Score (or pm_score)
    "missing_parent_id",  # answer without ParentId
    "not_an_integer",  # Id / Score / ParentId / PostTypeId that is not an integer
    "duplicate_id",  # a second row with an Id already seen on that site
    "invalid_json",  # a JSONL line that is not a JSON object
    "invalid_record",  # a preference record whose fields have the wrong types
)
ANSWER_SKIP_REASONS = (
    "orphan_answer",  # its question is not in the dump
    "empty_body",  # no text once converted to Markdown
    "markdown_failed",  # the HTML converter rejected the body
    "over_body_cap",  # HTML body longer than --max-body-chars
)
QUESTION_SKIP_REASONS = (
    "fewer_than_two_answers",
    "all_scores_equal",  # no two answers differ in score, so no preference pair
    "empty_body",  # neither title nor body text
    "over_body_cap",  # HTML body longer than --max-body-chars
    "not_in_any_subset",  # the subset fractions add up to less than 1
    "over_subset_cap",  # its subset already reached --<subset>-max-questions / -max-pairs
)


@dataclass
class Stats:
    posts_read: int = 0  # XML rows (all post types) or preference records
    questions: int = 0  # valid questions read
    answers: int = 0  # valid answers read
    other_post_types: int = 0  # tag wikis, wiki placeholders, ...: not used, not an error
    questions_paired: int = 0
    rows_skipped: Counter = field(default_factory=Counter)
    answers_skipped: Counter = field(default_factory=Counter)
    questions_skipped: Counter = field(default_factory=Counter)
    questions_per_subset: Counter = field(default_factory=Counter)
    pairs_per_subset: Counter = field(default_factory=Counter)
    inputs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # the judge subset is listed only when it holds questions (it is empty unless --judge-fraction is set)
        subsets = (*SUBSETS, JUDGE) if self.questions_per_subset.get(JUDGE) else SUBSETS
        return {
            "posts_read": self.posts_read,
            "questions": self.questions,
            "answers": self.answers,
            "other_post_types": self.other_post_types,
            "rows_skipped": _with_all_keys(self.rows_skipped, ROW_SKIP_REASONS),
            "answers_skipped": _with_all_keys(self.answers_skipped, ANSWER_SKIP_REASONS),
            "questions_skipped": _with_all_keys(self.questions_skipped, QUESTION_SKIP_REASONS),
            "questions_paired": self.questions_paired,
            "questions_per_subset": _with_all_keys(self.questions_per_subset, subsets),
            "pairs_per_subset": _with_all_keys(self.pairs_per_subset, subsets),
            "pairs_total": sum(self.pairs_per_subset.values()),
            "inputs": self.inputs,
        }


def _with_all_keys(counts: Counter, keys: tuple[str, ...]) -> dict[str, int]:
    unknown = set(counts) - set(keys)
    assert not unknown, f"undeclared stats reason(s): {sorted(unknown)}"  # a typo here would hide a skip
    return {k: int(counts.get(k, 0)) for k in keys}
