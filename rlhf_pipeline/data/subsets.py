"""Reading the subsets `rlhf prepare-data` wrote: validation, question-level splits, sampling, unique questions.

Rows come from `rlhf prepare-data` (one row per preference pair, `response_j` preferred over `response_k`).
Held-out rows are chosen by QUESTION (never the same question in train and eval), deterministically: the question
ids are ordered by a hash of the id and the first `eval_fraction` of them are held out. The split depends on the
ids only (not on --seed), so runs with different seeds are evaluated on the same questions.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

PAIR_COLUMNS = ("qid", "question", "response_j", "response_k", "score_j", "score_k", "answer_id_j", "answer_id_k")
TEXT_COLUMNS = ("question", "response_j", "response_k")


def read_subset(data_dir: str | Path, subset: str) -> list[dict[str, Any]]:
    """Rows of `<data_dir>/<subset>.parquet` as dicts; one-line UserError when missing, malformed or empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(data_dir) / f"{subset}.parquet"
    if not Path(data_dir).is_dir():
        raise UserError(f"data directory not found: {data_dir} (run `rlhf prepare-data` first)")
    if not path.is_file():
        raise UserError(f"{path} not found: --data must be a directory written by `rlhf prepare-data`")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(PAIR_COLUMNS)}")
    for column in TEXT_COLUMNS:  # a None text would fail deep inside tokenization, after the models loaded
        values = table.column(column)
        if values.null_count:
            raise UserError(f"{path}: column {column} has {values.null_count} null value(s); expected text")
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise UserError(f"{path}: column {column} is {values.type}, expected text (string)")
    rows = table.select(list(PAIR_COLUMNS)).to_pylist()
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def _question_key(qid: Any) -> str:
    return hashlib.sha256(str(qid).encode()).hexdigest()


def split_by_question(rows: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows with disjoint questions; eval holds ceil(eval_fraction x questions), at least one."""
    qids = sorted({r["qid"] for r in rows}, key=_question_key)
    if eval_fraction <= 0:
        return rows, []
    n_eval = min(max(1, math.ceil(eval_fraction * len(qids))), len(qids) - 1)
    if n_eval < 1:
        raise UserError(f"need at least 2 questions to hold some out for evaluation, got {len(qids)}")
    held_out = set(qids[:n_eval])
    return [r for r in rows if r["qid"] not in held_out], [r for r in rows if r["qid"] in held_out]


def limit(rows: list[dict], max_rows: int | None, seed: int) -> list[dict]:
    """At most `max_rows` rows, a seeded random sample (keeps the original order otherwise)."""
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]


def read_questions(data_dir: str | Path, subset: str, max_questions: int | None, seed: int) -> list[str]:
    """One question per qid of `<data_dir>/<subset>.parquet` (it has one row per pair), at most `max_questions`
    of them (a seeded sample in the original order)."""
    seen, questions = set(), []
    for row in read_subset(data_dir, subset):
        if row["qid"] not in seen:
            seen.add(row["qid"])
            questions.append(row["question"])
    return limit(questions, max_questions, seed)
