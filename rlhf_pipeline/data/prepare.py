"""`rlhf prepare-data`: Stack Exchange dump -> scored preference pairs in four disjoint subsets.

    inputs.py       which files --input names, and their site
    posts_xml.py    Posts.xml / .7z -> on-disk grouping (SQLite) -> one question with its answers at a time
    preferences.py  HuggingFaceH4/stack-exchange-preferences parquet / JSONL -> the same questions
    scoring.py      Askell et al. answer scores
    splits.py       question -> subset (hash of seed + qid), caps
    pairing.py      answers -> at most N (preferred, other) pairs, reproducibly
    markdown.py     HTML -> Markdown
    writer.py       incremental parquet + stats.json, moved into place only on success

The returned StageResult (status "prepared", the stats summary as its metrics) is also `<output>/metrics.json`.

Everything streams: memory does not grow with the dump (see docs/data.md for the measurements).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_pipeline import tracking
from rlhf_pipeline.data.config import PrepareDataConfig
from rlhf_pipeline.data.inputs import (
    POSTS_XML,
    PREFERENCES_JSONL,
    PREFERENCES_PARQUET,
    SITE_ARCHIVE,
    InputFile,
    discover_inputs,
    file_sha256,
)
from rlhf_pipeline.data.markdown import to_markdown
from rlhf_pipeline.data.pairing import choose_pairs
from rlhf_pipeline.data.posts_xml import PostStore, extract_posts_xml
from rlhf_pipeline.data.preferences import read_jsonl, read_parquet
from rlhf_pipeline.data.records import Question
from rlhf_pipeline.data.splits import SubsetAssigner
from rlhf_pipeline.data.stats import Stats
from rlhf_pipeline.data.writer import SubsetWriters, remove_stale
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import StageResult


def run_prepare_data(cfg: PrepareDataConfig) -> StageResult:
    """Run the stage; its metrics are the stats summary that is also written to <output>/stats.json. Tracked in
    MLflow (the counts as `data/` metrics, every split as a dataset input) when a tracking URI or run is set."""
    with tracking.data_run(cfg) as run:
        result = _prepare_data(cfg)
        tracking.log_prepared_data(run, result.output, result.metrics)
    return result


def _prepare_data(cfg: PrepareDataConfig) -> StageResult:
    inputs = discover_inputs(cfg.input, cfg.site)
    output_dir = Path(cfg.output)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output {output_dir} exists and is not a directory")
    stats = Stats()
    assigner = SubsetAssigner(cfg)
    writers = SubsetWriters(output_dir, cfg.row_group_size)
    try:
        scratch_root = Path(cfg.tmp_dir or tempfile.gettempdir())
        remove_stale(scratch_root, "rlhf-prepare-data-")  # a killed run's scratch copy of the dump
        with tempfile.TemporaryDirectory(prefix=f"rlhf-prepare-data-{os.getpid()}-", dir=scratch_root) as scratch:
            for index, inp in enumerate(inputs):
                for question in _questions(inp, Path(scratch) / str(index), stats):
                    _add_question(question, cfg, assigner, writers, stats)
        summary = _summary(cfg, stats)
        if stats.posts_read == 0:
            raise UserError(f"no posts in {cfg.input}: the dump is empty")
        if summary["pairs_total"] == 0:
            skipped = {k: v for k, v in summary["questions_skipped"].items() if v}
            raise UserError(
                f"no preference pairs from {cfg.input}: {stats.questions} questions, {stats.answers} answers, "
                f"questions skipped: {skipped or 'none'}"
            )
        writers.commit(summary)
    except BaseException:
        writers.abort()
        raise
    result = StageResult.of("prepare_data", "prepared", output_dir, summary)
    result.write()
    return result


def _questions(inp: InputFile, scratch: Path, stats: Stats) -> Iterator[Question]:
    """The questions of one input file, streamed; records the file in stats.inputs."""
    record: dict[str, Any] = {
        "path": str(inp.path),
        "format": inp.format,
        "site": inp.site,
        "bytes": inp.path.stat().st_size,
    }
    stats.inputs.append(record)
    if inp.format in (POSTS_XML, SITE_ARCHIVE):
        scratch.mkdir(parents=True)
        xml_path = inp.path
        if inp.format == SITE_ARCHIVE:
            record["sha256"] = file_sha256(inp.path)  # of the archive: the bytes the user gave us
            xml_path = extract_posts_xml(inp.path, scratch / "extracted")
        store = PostStore(scratch / "posts.sqlite")
        try:
            xml_sha256 = store.load(xml_path, stats)
            if inp.format == SITE_ARCHIVE:
                record["posts_xml_sha256"] = xml_sha256
                xml_path.unlink()  # free the disk before the pairing pass
            else:
                record["sha256"] = xml_sha256  # hashed while parsing: the file is read only once
            yield from store.questions_with_answers(inp.site, stats)
        finally:
            store.close()
    elif inp.format == PREFERENCES_PARQUET:
        record["sha256"] = file_sha256(inp.path)
        yield from read_parquet(inp.path, inp.site, stats)
    elif inp.format == PREFERENCES_JSONL:
        record["sha256"] = file_sha256(inp.path)
        yield from read_jsonl(inp.path, inp.site, stats)
    else:  # discover_inputs only returns the formats above
        raise AssertionError(f"unhandled input format {inp.format}")


def _add_question(
    question: Question, cfg: PrepareDataConfig, assigner: SubsetAssigner, writers: SubsetWriters, stats: Stats
) -> None:
    """Decide whether and where a question goes, then write its pairs. Cheap checks come first, so only
    bodies that can end up in a pair are converted to Markdown (the costly step)."""
    skipped = stats.questions_skipped
    if len(question.answers) < 2:
        skipped["fewer_than_two_answers"] += 1
        return
    if len({a.score for a in question.answers}) < 2:
        skipped["all_scores_equal"] += 1
        return
    subset = assigner.subset_of(question.qid)
    if subset is None:
        skipped["not_in_any_subset"] += 1
        return
    if assigner.is_full(subset):
        skipped["over_subset_cap"] += 1
        return
    cap = cfg.max_body_chars
    if cap is not None and len(question.body_html or "") > cap:
        skipped["over_body_cap"] += 1
        return
    question_text = _question_markdown(question)
    if not question_text:
        skipped["empty_body"] += 1
        return

    markdown: dict[int, str] = {}
    for answer in question.answers:
        if cap is not None and len(answer.body_html or "") > cap:
            stats.answers_skipped["over_body_cap"] += 1
            continue
        text = to_markdown(answer.body_html)
        if text is None:
            stats.answers_skipped["markdown_failed"] += 1
        elif not text:
            stats.answers_skipped["empty_body"] += 1
        else:
            markdown[answer.answer_id] = text
    usable = [a for a in question.answers if a.answer_id in markdown]
    pairs = choose_pairs(usable, cfg.max_pairs_per_question, cfg.seed, question.qid)
    if not pairs:
        skipped["fewer_than_two_answers" if len(usable) < 2 else "all_scores_equal"] += 1
        return
    room = assigner.pair_room(subset)
    if room is not None:
        pairs = pairs[:room]  # the last question into a pair-capped subset may contribute part of its pairs

    for better, worse in pairs:
        writers.add(
            subset,
            {
                "qid": question.qid,
                "site": question.site,
                "question": question_text,
                "response_j": markdown[better.answer_id],
                "response_k": markdown[worse.answer_id],
                "score_j": better.score,
                "score_k": worse.score,
                "answer_id_j": better.answer_id,
                "answer_id_k": worse.answer_id,
            },
        )
    assigner.record(subset, len(pairs))
    stats.questions_paired += 1
    stats.questions_per_subset[subset] += 1
    stats.pairs_per_subset[subset] += len(pairs)


def _question_markdown(question: Question) -> str:
    """Title, a blank line, then the body as Markdown (StackLLaMA's question = title + body)."""
    body = to_markdown(question.body_html) or ""
    return "\n\n".join(part for part in (question.title.strip(), body) if part)


def _summary(cfg: PrepareDataConfig, stats: Stats) -> dict[str, Any]:
    summary = stats.to_dict()
    hashes = [i.get("sha256", "") for i in stats.inputs]
    # One input: its own sha256. Several: the hash of their (site, format, sha256) list, in discovery order.
    summary["input_sha256"] = (
        hashes[0]
        if len(hashes) == 1
        else hashlib.sha256(
            "\n".join(f"{i['site']} {i['format']} {i['sha256']}" for i in stats.inputs).encode()
        ).hexdigest()
    )
    summary["config"] = cfg.to_flat_dict()
    return summary
