"""HuggingFaceH4/stack-exchange-preferences records (local .parquet or .jsonl) -> questions.

Schema: qid, question (HTML), answers: [{answer_id, pm_score, selected, text (HTML), ...}], plus
fields we do not need. `pm_score` is already the Askell score (acceptance included), so it is used as is;
`selected` is not added again. Each record holds a whole question, so no grouping is needed: files are
streamed record batch by record batch (parquet) or line by line (JSONL).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.data.records import Answer, Question
from rlhf_pipeline.data.stats import Stats
from rlhf_pipeline.errors import UserError

REQUIRED_COLUMNS = ("qid", "question", "answers")
_PARQUET_BATCH_ROWS = 256  # H4 records carry whole threads; small batches keep memory flat


def read_parquet(path: Path, site: str, stats: Stats) -> Iterator[Question]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path} is not a readable parquet file: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} of the stack-exchange-preferences schema")
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(REQUIRED_COLUMNS)):
        for record in batch.to_pylist():
            stats.posts_read += 1
            question = _question_from_record(record, site, stats)
            if question is not None:
                yield question


def read_jsonl(path: Path, site: str, stats: Stats) -> Iterator[Question]:
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            stats.posts_read += 1
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                stats.rows_skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict):
                stats.rows_skipped["invalid_json"] += 1
                continue
            question = _question_from_record(record, site, stats)
            if question is not None:
                yield question


def _question_from_record(record: dict[str, Any], site: str, stats: Stats) -> Question | None:
    qid = record.get("qid")
    if qid is None:
        stats.rows_skipped["missing_id"] += 1
        return None
    answers_in = record.get("answers")
    question_html = record.get("question")
    if not isinstance(answers_in, list) or not isinstance(question_html, str):
        stats.rows_skipped["invalid_record"] += 1
        return None
    try:
        post_id = int(qid)
    except (TypeError, ValueError):
        stats.rows_skipped["not_an_integer"] += 1
        return None
    stats.questions += 1
    answers = []
    for item in answers_in:
        if not isinstance(item, dict) or not isinstance(item.get("text", ""), str):
            stats.rows_skipped["invalid_record"] += 1
            continue
        if item.get("answer_id") is None:
            stats.rows_skipped["missing_id"] += 1
            continue
        if item.get("pm_score") is None:
            stats.rows_skipped["missing_score"] += 1
            continue
        try:
            answers.append(Answer(int(item["answer_id"]), int(item["pm_score"]), item.get("text") or ""))
        except (TypeError, ValueError):
            stats.rows_skipped["not_an_integer"] += 1
            continue
        stats.answers += 1
    # The schema has no title field: `question` is the whole question text.
    return Question(site, post_id, "", question_html, answers)
