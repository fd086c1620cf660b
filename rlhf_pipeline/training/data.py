"""Reading prepared subsets for SFT and the reward model: validation, question-level splits, tokenization.

Rows come from `rlhf prepare-data` (one row per preference pair, `response_j` preferred over `response_k`).
Held-out rows are chosen by QUESTION (never the same question in train and eval), deterministically: the question
ids are ordered by a hash of the id and the first `eval_fraction` of them are held out. The split depends on the
ids only (not on --seed), so runs with different seeds are evaluated on the same questions.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.options import format_example

PAIR_COLUMNS = ("qid", "question", "response_j", "response_k", "score_j", "score_k", "answer_id_j", "answer_id_k")


def read_subset(data_dir: str | Path, subset: str) -> list[dict[str, Any]]:
    """Rows of `<data_dir>/<subset>.parquet` as dicts; one-line UserError when missing, malformed or empty."""
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


# ----------------------------------------------------------------------------------------------------------------
# SFT: one text per (question, preferred answer)
# ----------------------------------------------------------------------------------------------------------------


def sft_texts(rows: list[dict], template: str) -> list[str]:
    """Prompt + preferred answer, once per (qid, answer_id_j): a question with 5 pairs won by the same answer
    would otherwise train on that answer 5 times."""
    seen: set[tuple[Any, Any]] = set()
    texts = []
    for row in rows:
        key = (row["qid"], row["answer_id_j"])
        if key in seen:
            continue
        seen.add(key)
        texts.append(format_example(template, row["question"], row["response_j"]))
    return texts


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's own BOS, if it adds one) followed by EOS, the document end."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; packing needs one to separate documents")
    if not texts:  # e.g. --eval-fraction 0: the tokenizer rejects an empty batch
        return []
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] if not ids or ids[-1] != eos else ids for ids in encoded]


# ----------------------------------------------------------------------------------------------------------------
# Reward model: tokenized (chosen, rejected) pairs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedPairs:
    chosen: list[list[int]]
    rejected: list[list[int]]
    dropped_too_long: int

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.chosen[index], self.rejected[index]


def tokenize_pairs(tokenizer, rows: list[dict], template: str, max_length: int) -> TokenizedPairs:
    """Prompt + response_j (chosen) and prompt + response_k (rejected), each ending in EOS.

    A pair where either side is longer than `max_length` tokens is DROPPED (and counted), not truncated: a cut-off
    answer is not the answer the votes were about.
    """
    chosen_texts = [format_example(template, r["question"], r["response_j"]) for r in rows]
    rejected_texts = [format_example(template, r["question"], r["response_k"]) for r in rows]
    chosen_ids = tokenize_documents(tokenizer, chosen_texts)
    rejected_ids = tokenize_documents(tokenizer, rejected_texts)
    kept_j, kept_k = [], []
    for ids_j, ids_k in zip(chosen_ids, rejected_ids):
        if len(ids_j) <= max_length and len(ids_k) <= max_length:
            kept_j.append(ids_j)
            kept_k.append(ids_k)
    return TokenizedPairs(kept_j, kept_k, dropped_too_long=len(rows) - len(kept_j))
