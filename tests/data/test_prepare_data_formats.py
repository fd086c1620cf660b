"""Every input format gives the same pairs: Posts.xml, a .7z site archive, H4 parquet / JSONL, a directory."""

from __future__ import annotations

import json
from pathlib import Path

import py7zr
import pyarrow as pa
import pyarrow.parquet as pq
from prepare_data_helpers import posts_xml, small_dump_rows

from rlhf_pipeline.data.config import SUBSETS


def all_rows(out: Path) -> list[dict]:
    rows = [r for s in SUBSETS for r in pq.read_table(out / f"{s}.parquet").to_pylist()]
    return sorted(rows, key=lambda r: (r["qid"], r["answer_id_j"], r["answer_id_k"]))


def pair_keys(rows: list[dict]) -> list[tuple]:
    return [(r["qid"], r["answer_id_j"], r["answer_id_k"], r["score_j"], r["score_k"]) for r in rows]


def test_posts_xml_pairs_and_scores(small_dump, tmp_path, run_cli):
    result = run_cli("--input", small_dump, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    rows = all_rows(tmp_path / "out")
    # scores: a2 = round(log2 11) = 3; a3 = round(log2 3) + 1 = 3 (accepted); a4 = -1; a6 = 0; a7 = 3.
    assert pair_keys(rows) == [
        ("tiny.stackexchange.com:1", 2, 4, 3, -1),  # a2 vs a3 tie (3 = 3): no pair
        ("tiny.stackexchange.com:1", 3, 4, 3, -1),
        ("tiny.stackexchange.com:5", 7, 6, 3, 0),
    ]
    assert rows[2]["question"] == "A question?\n\nWhy?" and rows[2]["response_j"] == "Answer 7 with score 7."
    stats = json.loads(result.stdout)
    assert stats["questions_skipped"]["fewer_than_two_answers"] == 1  # q8


def test_site_archive_7z(small_dump, tmp_path, run_cli):
    archive = tmp_path / "tiny.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(small_dump, "Posts.xml")
        z.writestr("<users />", "Users.xml")
    result = run_cli("--input", archive, "--output", tmp_path / "from7z")
    assert result.exit_code == 0, result.stderr
    run_cli("--input", small_dump, "--output", tmp_path / "fromxml")
    assert all_rows(tmp_path / "from7z") == all_rows(tmp_path / "fromxml")
    record = json.loads((tmp_path / "from7z" / "stats.json").read_text())["inputs"][0]
    assert record["format"] == "7z" and record["site"] == "tiny.stackexchange.com"
    assert record["posts_xml_sha256"] != record["sha256"]  # archive bytes vs. the Posts.xml inside


def h4_records() -> list[dict]:
    """The small dump in the HuggingFaceH4/stack-exchange-preferences schema (pm_score already scored)."""

    def ans(aid, pm, selected=False):
        return {
            "answer_id": aid,
            "author": "x",
            "author_id": 1,
            "author_profile": "u",
            "pm_score": pm,
            "selected": selected,
            "text": f"<p>Answer {aid} &amp; more</p>",
        }

    return [
        {
            "qid": 1,
            "question": "<p>A question?</p>",
            "answers": [ans(2, 3), ans(3, 3, True), ans(4, -1)],
            "date": "2014-01-01",
            "metadata": ["m"],
        },
        {"qid": 5, "question": "<p>Another</p>", "answers": [ans(6, 0), ans(7, 3)], "date": "d", "metadata": []},
        {"qid": 8, "question": "<p>Lonely</p>", "answers": [ans(9, 1)], "date": "d", "metadata": []},
    ]


def test_h4_parquet_and_jsonl_give_the_same_pairs(tmp_path, run_cli):
    site_dir = tmp_path / "tiny.stackexchange.com"
    site_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(h4_records()), site_dir / "train-00000.parquet")
    (tmp_path / "j" / "tiny.stackexchange.com").mkdir(parents=True)
    jsonl = tmp_path / "j" / "tiny.stackexchange.com" / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in h4_records()) + "\n")

    expected = [
        ("tiny.stackexchange.com:1", 2, 4, 3, -1),
        ("tiny.stackexchange.com:1", 3, 4, 3, -1),
        ("tiny.stackexchange.com:5", 7, 6, 3, 0),
    ]
    for source, out in ((site_dir / "train-00000.parquet", tmp_path / "o1"), (jsonl, tmp_path / "o2")):
        result = run_cli("--input", source, "--output", out)
        assert result.exit_code == 0, result.stderr
        rows = all_rows(out)
        assert pair_keys(rows) == expected
        assert rows[0]["response_j"] == "Answer 2 & more"
        assert rows[0]["question"] == "A question?"


def test_directory_of_sites_keeps_qids_distinct(small_dump, tmp_path, run_cli):
    # Two sites whose post ids collide (both have questions 1 and 5): qids must stay distinct.
    root = tmp_path / "dumps"
    for site in ("a.stackexchange.com", "b.stackexchange.com"):
        (root / site).mkdir(parents=True)
        (root / site / "Posts.xml").write_text(posts_xml(small_dump_rows()))
        (root / site / "SOURCE.md").write_text("ignored")
    with py7zr.SevenZipFile(root / "c.stackexchange.com.7z", "w") as z:
        z.write(small_dump, "Posts.xml")
    result = run_cli("--input", root, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    rows = all_rows(tmp_path / "out")
    assert len(rows) == 9
    assert {r["site"] for r in rows} == {"a.stackexchange.com", "b.stackexchange.com", "c.stackexchange.com"}
    assert len({r["qid"] for r in rows}) == 6  # 2 paired questions x 3 sites
    stats = json.loads(result.stdout)
    assert len(stats["inputs"]) == 3 and stats["posts_read"] == 27
