"""Incremental parquet output: one file per subset, written in row groups so memory stays bounded.

Files are written into a staging directory inside the output directory and moved into place only when
the whole run succeeded, so a failed run never leaves a partial dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.data.config import ALL_SUBSETS

SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string()),  # "<site>:<question post id>", unique across sites
        pa.field("site", pa.string()),
        pa.field("question", pa.string()),  # Markdown: title, blank line, body
        pa.field("response_j", pa.string()),  # the preferred answer (Markdown)
        pa.field("response_k", pa.string()),  # the other answer (Markdown)
        pa.field("score_j", pa.int32()),  # Askell scores; score_j > score_k always
        pa.field("score_k", pa.int32()),
        pa.field("answer_id_j", pa.int64()),
        pa.field("answer_id_k", pa.int64()),
    ]
)
COLUMNS = SCHEMA.names


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove `<parent>/<prefix><pid>-*` directories whose process is gone (a killed prepare-data's partial parquet
    or scratch copy of the dump); those of a live process (a concurrent run) stay."""
    removed = []
    for path in parent.glob(f"{prefix}*"):
        pid = path.name.removeprefix(prefix).split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SubsetWriters:
    """`add(subset, row)` buffers rows; every `row_group_size` rows become one parquet row group."""

    def __init__(self, output_dir: Path, row_group_size: int):
        self.output_dir = output_dir
        self.row_group_size = row_group_size
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(output_dir, ".staging-")
        self.staging = output_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.writers = {
            s: pq.ParquetWriter(self.staging / f"{s}.parquet", SCHEMA, compression="zstd") for s in ALL_SUBSETS
        }
        self.buffers: dict[str, dict[str, list]] = {s: {c: [] for c in COLUMNS} for s in ALL_SUBSETS}
        self.buffered = dict.fromkeys(ALL_SUBSETS, 0)

    def add(self, subset: str, row: dict[str, Any]) -> None:
        buf = self.buffers[subset]
        for c in COLUMNS:
            buf[c].append(row[c])
        self.buffered[subset] += 1
        if self.buffered[subset] >= self.row_group_size:
            self._flush(subset)

    def _flush(self, subset: str) -> None:
        if self.buffered[subset]:
            table = pa.Table.from_pydict(self.buffers[subset], schema=SCHEMA)
            self.writers[subset].write_table(table)
            self.buffers[subset] = {c: [] for c in COLUMNS}
            self.buffered[subset] = 0

    def commit(self, stats: dict[str, Any]) -> None:
        """Close the files and move them, then stats.json, into the output directory."""
        for subset in ALL_SUBSETS:
            self._flush(subset)
            self.writers[subset].close()
        (self.staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        for subset in ALL_SUBSETS:
            os.replace(self.staging / f"{subset}.parquet", self.output_dir / f"{subset}.parquet")
        os.replace(self.staging / "stats.json", self.output_dir / "stats.json")  # last: marks a complete run
        self.staging.rmdir()

    def abort(self) -> None:
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception:  # already failing: cleaning up must not mask the original error
                pass
        shutil.rmtree(self.staging, ignore_errors=True)
