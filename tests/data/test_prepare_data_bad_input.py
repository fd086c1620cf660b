"""Bad input through the CLI: one `rlhf prepare-data: error: ...` line and exit 2, or a counted skip."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepare_data_helpers import answer, posts_xml, question, small_dump_rows

PREFIX = "rlhf prepare-data: error: "


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line: no traceback, no tqdm noise
    assert lines[0].startswith(PREFIX), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_truncated_xml(tmp_path, run_cli):
    text = posts_xml(small_dump_rows())
    dump = write(tmp_path / "s" / "Posts.xml", text[: len(text) // 2])
    out = tmp_path / "out"
    assert_one_error_line(run_cli("--input", dump, "--output", out), "not well-formed XML", "truncated")
    assert not list(out.glob("*.parquet")) and not (out / "stats.json").exists()  # nothing half-written


def test_non_utf8_bytes(tmp_path, run_cli):
    data = posts_xml(small_dump_rows()).encode().replace(b"Answer 3", b"Answer \xff\xfe")
    dump = write(tmp_path / "s" / "Posts.xml", data)
    assert_one_error_line(run_cli("--input", dump, "--output", tmp_path / "out"), "character encoding")


def test_rows_missing_score_or_parent_and_orphans_are_counted(tmp_path, run_cli):
    rows = small_dump_rows() + [
        {"Id": 20, "PostTypeId": 2, "ParentId": 1, "Body": "<p>no score</p>"},
        {"Id": 21, "PostTypeId": 2, "Score": 4, "Body": "<p>no parent</p>"},
        {"PostTypeId": 2, "ParentId": 1, "Score": 4, "Body": "<p>no id</p>"},
        {"Id": 22, "PostTypeId": 2, "ParentId": 1, "Score": "many", "Body": "<p>bad score</p>"},
        answer(23, 999, 5),  # its question is absent from the dump
        answer(2, 1, 50),  # a second row with id 2
    ]
    dump = write(tmp_path / "s" / "Posts.xml", posts_xml(rows))
    result = run_cli("--input", dump, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_skipped"] == {
        **stats["rows_skipped"],
        "missing_score": 1,
        "missing_parent_id": 1,
        "missing_id": 1,
        "not_an_integer": 1,
        "duplicate_id": 1,
    }
    assert stats["answers_skipped"]["orphan_answer"] == 1
    assert stats["answers"] == 7  # the 6 of the small dump + the orphan, which is read then not paired
    assert stats["pairs_total"] == 3


@pytest.mark.parametrize("content, fragment", [(b"", "is empty"), (b"<posts></posts>", "no posts")])
def test_empty_dump(tmp_path, run_cli, content, fragment):
    dump = write(tmp_path / "s" / "Posts.xml", content)
    assert_one_error_line(run_cli("--input", dump, "--output", tmp_path / "out"), fragment)


def test_dump_with_no_eligible_question(tmp_path, run_cli):
    rows = [question(1), answer(2, 1, 3), question(4), answer(5, 4, 1), answer(6, 4, 1)]  # 1 answer; a tie
    dump = write(tmp_path / "s" / "Posts.xml", posts_xml(rows))
    out = tmp_path / "out"
    assert_one_error_line(
        run_cli("--input", dump, "--output", out), "no preference pairs", "fewer_than_two_answers", "all_scores_equal"
    )
    assert not list(out.glob("*.parquet"))


def test_missing_path(tmp_path, run_cli):
    assert_one_error_line(run_cli("--input", tmp_path / "nope.xml", "--output", tmp_path / "o"), "input not found")


def test_missing_required_option(tmp_path, run_cli):
    assert_one_error_line(run_cli("--output", tmp_path / "o"), "input")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("data.csv", "a,b\n1,2\n", "unsupported input"),
        ("Posts.xml", '{"json": "instead"}', "not well-formed XML"),
        ("Posts.xml", "<users><row Id='1' /></users>", "root element is <users>"),
        ("site.7z", "not an archive", "cannot read the 7z archive"),
        ("prefs.parquet", "not parquet at all", "not a readable parquet file"),
    ],
)
def test_wrong_format(tmp_path, run_cli, name, content, fragment):
    path = write(tmp_path / "s" / name, content)
    assert_one_error_line(run_cli("--input", path, "--output", tmp_path / "o"), fragment)


def test_parquet_without_the_preference_columns(tmp_path, run_cli):
    path = tmp_path / "s" / "x.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"]}), path)
    assert_one_error_line(run_cli("--input", path, "--output", tmp_path / "o"), "lacks column(s) qid")


def test_jsonl_of_garbage_is_counted_then_fails_for_lack_of_pairs(tmp_path, run_cli):
    path = write(tmp_path / "s" / "x.jsonl", "not json\n[1, 2]\n")
    result = run_cli("--input", path, "--output", tmp_path / "o")
    assert_one_error_line(result, "no preference pairs")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-pairs-per-question", "0"], "--max-pairs-per-question"),
        (["--seed", "abc"], "--seed"),
        (["--finetune-fraction", "0.9", "--reward-fraction", "0.9"], "add up to"),
        (["--rl-max-pairs", "-3"], "--rl-max-pairs"),
        (["--no-such-option", "1"], "No such option"),
    ],
)
def test_invalid_option(small_dump, tmp_path, run_cli, args, fragment):
    assert_one_error_line(run_cli("--input", small_dump, "--output", tmp_path / "o", *args), fragment)


def test_site_with_a_directory_is_refused(small_dump, tmp_path, run_cli):
    assert_one_error_line(run_cli("--input", small_dump.parent, "--output", tmp_path / "o", "--site", "x"), "--site")


def test_two_dumps_of_one_site_are_refused(tmp_path, run_cli):
    for sub in ("x/site.example", "y/site.example"):
        write(tmp_path / "d" / sub / "Posts.xml", posts_xml(small_dump_rows()))
    assert_one_error_line(run_cli("--input", tmp_path / "d", "--output", tmp_path / "o"), "two dumps of site")


def test_pathological_bodies_are_skipped_and_counted(tmp_path, run_cli):
    huge = "<p>" + "hops " * 50_000 + "</p>"  # 250,003 characters: far over Stack Exchange's 30,000 limit
    rows = [
        question(1),
        answer(2, 1, 5),
        answer(3, 1, 1),
        answer(4, 1, 9, body=huge),  # the best-scored answer, but pathological: skipped, not truncated
        question(10, body=huge),
        answer(11, 10, 3),
        answer(12, 10, 0),
    ]
    dump = write(tmp_path / "s" / "Posts.xml", posts_xml(rows))
    all_to_evaluation = ["--evaluation-fraction", "1", "--finetune-fraction", "0", "--reward-fraction", "0"]
    all_to_evaluation += ["--rl-fraction", "0"]
    result = run_cli("--input", dump, "--output", tmp_path / "out", *all_to_evaluation)
    assert result.exit_code == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["answers_skipped"]["over_body_cap"] == 1 and stats["questions_skipped"]["over_body_cap"] == 1
    table = pq.read_table(tmp_path / "out" / "evaluation.parquet").to_pylist()
    assert [(r["answer_id_j"], r["answer_id_k"]) for r in table] == [(2, 3)]  # question 1 kept, without answer 4

    result = run_cli("--input", dump, "--output", tmp_path / "uncapped", "--max-body-chars", "none", *all_to_evaluation)
    assert result.exit_code == 0, result.stderr
    stats = json.loads((tmp_path / "uncapped" / "stats.json").read_text())
    assert stats["answers_skipped"]["over_body_cap"] == 0 and stats["questions_skipped"]["over_body_cap"] == 0
    assert stats["questions_paired"] == 2
