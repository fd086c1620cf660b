"""Small prepared-data directories for the SFT / reward tests: parquet files with the prepare-data columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.data.subsets import PAIR_COLUMNS

# Short, distinct, repetitive answers: a tiny model can memorise them in a few dozen steps.
TOPICS = ["lager", "stout", "porter", "ale", "pilsner", "bock", "saison", "gose"]


def pair_rows(num_questions: int = 8, pairs_per_question: int = 2) -> list[dict]:
    """Every question has one good answer (always preferred, so SFT sees it once) and a few bad ones."""
    rows = []
    for q in range(num_questions):
        topic = TOPICS[q % len(TOPICS)]
        for k in range(pairs_per_question):
            rows.append(
                {
                    "qid": f"beer:{q}",
                    "question": f"What is a {topic}?",
                    "response_j": f"A {topic} is a beer. It is brewed with malt and hops. Cheers to the {topic}!",
                    "response_k": "no idea" if k % 2 == 0 else "ask someone else please",
                    "score_j": 5,
                    "score_k": 0,
                    "answer_id_j": 1000 + q,
                    "answer_id_k": 2000 + 10 * q + k,
                }
            )
    return rows


def write_subset(data_dir: Path, subset: str, rows: list[dict]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({col: [r[col] for r in rows] for col in PAIR_COLUMNS})
    path = data_dir / f"{subset}.parquet"
    pq.write_table(table, path)
    return path


def make_data_dir(data_dir: Path, num_questions: int = 8, pairs_per_question: int = 2) -> Path:
    rows = pair_rows(num_questions, pairs_per_question)
    for subset in ("finetune", "reward", "evaluation"):
        write_subset(data_dir, subset, rows)
    return data_dir
