"""Stack Exchange Posts.xml (bare or inside a .7z site archive) -> questions with their answers.

A dump lists posts by id, and an answer can come long after its question, so we cannot group in memory
(Stack Overflow's Posts.xml is ~100 GB). Pass 1 streams the XML with lxml.iterparse, clearing each row,
into a temporary SQLite file; pass 2 walks questions and answers (indexed by parent) in id order and
merge-joins them, yielding one question at a time. Memory stays bounded by SQLite's page cache and one
batch of rows; disk use is about the size of the dump.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import py7zr
from lxml import etree
from tqdm import tqdm

from rlhf_pipeline.data.inputs import HashingReader
from rlhf_pipeline.data.records import Answer, Question
from rlhf_pipeline.data.scoring import askell_score
from rlhf_pipeline.data.stats import Stats
from rlhf_pipeline.errors import UserError

_BATCH_ROWS = 2000  # rows per executemany: amortizes the sqlite call without holding much text
QUESTION, ANSWER = "1", "2"


def extract_posts_xml(archive: Path, dest_dir: Path) -> Path:
    """Extract Posts.xml from a site archive to dest_dir (py7zr writes it in chunks, never whole in memory)."""
    try:
        with py7zr.SevenZipFile(archive, "r") as z:
            members = [n for n in z.getnames() if PurePosixPath(n).name.lower() == "posts.xml"]
            if not members:
                raise UserError(f"{archive}: the archive holds no Posts.xml")
            z.extract(path=dest_dir, targets=[members[0]])
    except (
        py7zr.Bad7zFile,
        py7zr.exceptions.ArchiveError,
        py7zr.exceptions.CrcError,
        py7zr.DecompressionError,
        py7zr.UnsupportedCompressionMethodError,
        py7zr.exceptions.PasswordRequired,
        EOFError,
        OSError,
    ) as exc:
        raise UserError(f"{archive}: cannot read the 7z archive ({type(exc).__name__}: {exc})") from None
    extracted = dest_dir / members[0]
    if not extracted.is_file():
        raise UserError(f"{archive}: extracting {members[0]} produced no file")
    return extracted


class PostStore:
    """The temporary on-disk grouping of one site's questions and answers."""

    def __init__(self, db_path: Path):
        self.conn = sqlite3.connect(db_path)
        # A scratch file: durability is worthless here, and these pragmas make the bulk load ~3x faster.
        self.conn.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -65536;  -- 64 MiB page cache: the bound on SQLite's memory
            PRAGMA temp_store = FILE;
            CREATE TABLE questions (id INTEGER PRIMARY KEY, accepted INTEGER, title TEXT, body TEXT);
            CREATE TABLE answers (id INTEGER PRIMARY KEY, parent INTEGER NOT NULL, score INTEGER NOT NULL, body TEXT);
            """
        )

    def close(self) -> None:
        self.conn.close()

    def _insert(self, table: str, rows: list[tuple], stats: Stats) -> None:
        if rows:
            cur = self.conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?, ?)", rows)
            duplicates = len(rows) - cur.rowcount  # OR IGNORE keeps the first row with an id
            if duplicates:
                stats.rows_skipped["duplicate_id"] += duplicates
                if table == "questions":
                    stats.questions -= duplicates
                else:
                    stats.answers -= duplicates

    def load(self, xml_path: Path, stats: Stats) -> str:
        """Pass 1: stream Posts.xml into the store. Returns the sha256 of the file's bytes."""
        size = xml_path.stat().st_size
        if size == 0:
            raise UserError(f"{xml_path} is empty")
        questions: list[tuple] = []
        answers: list[tuple] = []
        with (
            xml_path.open("rb") as raw,
            tqdm(total=size, unit="B", unit_scale=True, desc="read posts", disable=None, leave=False) as bar,
        ):
            reader = HashingReader(raw)
            context = etree.iterparse(
                reader, events=("end",), tag="row", resolve_entities=False, no_network=True, huge_tree=True
            )
            try:
                for _, row in context:
                    if stats.posts_read == 0:
                        _check_root(xml_path, row.getparent())
                    stats.posts_read += 1
                    _parse_row(row.attrib, questions, answers, stats)
                    # Free the row and the already-seen siblings the root still references.
                    row.clear(keep_tail=False)
                    while row.getprevious() is not None:
                        del row.getparent()[0]
                    if len(questions) + len(answers) >= _BATCH_ROWS:
                        self._insert("questions", questions, stats)
                        self._insert("answers", answers, stats)
                        questions.clear()
                        answers.clear()
                        bar.update(reader.bytes_read - bar.n)
            except etree.XMLSyntaxError as exc:
                first_line = str(exc.msg or exc).strip().splitlines()[0]
                raise UserError(
                    f"{xml_path} is not well-formed XML (line {exc.lineno}): {first_line}; "
                    "is it truncated, not UTF-8, or not a Posts.xml?"
                ) from None
            _check_root(xml_path, context.root)
            bar.update(reader.bytes_read - bar.n)
        self._insert("questions", questions, stats)
        self._insert("answers", answers, stats)
        # Built after the bulk load: one sort instead of a B-tree update per row.
        self.conn.execute("CREATE INDEX answers_by_parent ON answers (parent, id)")
        self.conn.commit()
        return reader.sha256.hexdigest()

    def questions_with_answers(self, site: str, stats: Stats) -> Iterator[Question]:
        """Pass 2: merge-join questions (by id) with answers (by parent id); count answers with no question."""
        questions = self.conn.execute("SELECT id, accepted, title, body FROM questions ORDER BY id")
        answers = self.conn.cursor().execute("SELECT parent, id, score, body FROM answers ORDER BY parent, id")
        pending = next(answers, None)
        for post_id, accepted_id, title, body in questions:
            group = []
            while pending is not None and pending[0] <= post_id:
                parent, answer_id, votes, answer_body = pending
                if parent < post_id:
                    stats.answers_skipped["orphan_answer"] += 1
                else:
                    group.append(Answer(answer_id, askell_score(votes, answer_id == accepted_id), answer_body))
                pending = next(answers, None)
            yield Question(site, post_id, title, body, group)
        while pending is not None:
            stats.answers_skipped["orphan_answer"] += 1
            pending = next(answers, None)


def _check_root(xml_path: Path, root: Any) -> None:
    if root is None or root.tag != "posts":
        tag = "none" if root is None else f"<{root.tag}>"
        raise UserError(f"{xml_path} is not a Stack Exchange Posts.xml: root element is {tag}, expected <posts>")


def _parse_row(attrib: Any, questions: list[tuple], answers: list[tuple], stats: Stats) -> None:
    """Validate one <row> and queue it for the store, or count why it is skipped."""
    post_type = attrib.get("PostTypeId")
    if post_type is None:
        stats.rows_skipped["missing_post_type"] += 1
        return
    if post_type != QUESTION and post_type != ANSWER:
        if not post_type.strip().isdigit():
            stats.rows_skipped["not_an_integer"] += 1
        else:
            stats.other_post_types += 1
        return
    raw_id = attrib.get("Id")
    if raw_id is None:
        stats.rows_skipped["missing_id"] += 1
        return
    try:
        if post_type == QUESTION:
            accepted = attrib.get("AcceptedAnswerId")
            questions.append(
                (
                    int(raw_id),
                    int(accepted) if accepted is not None else None,
                    attrib.get("Title", ""),
                    attrib.get("Body", ""),
                )
            )
            stats.questions += 1
            return
        raw_parent, raw_score = attrib.get("ParentId"), attrib.get("Score")
        if raw_parent is None:
            stats.rows_skipped["missing_parent_id"] += 1
            return
        if raw_score is None:
            stats.rows_skipped["missing_score"] += 1
            return
        answers.append((int(raw_id), int(raw_parent), int(raw_score), attrib.get("Body", "")))
        stats.answers += 1
    except ValueError:
        stats.rows_skipped["not_an_integer"] += 1
