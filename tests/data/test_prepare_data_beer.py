"""The stage on the real beer dump, checked against counts this test computes itself with ElementTree."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlhf_pipeline.data.config import SUBSETS, PrepareDataConfig
from rlhf_pipeline.data.prepare import run_prepare_data

SITE = "beer.stackexchange.com"


def independent_score(votes: int, accepted: bool) -> int:
    return -1 if votes < 0 else math.floor(math.log2(1 + votes) + 0.5) + int(accepted)


@pytest.fixture(scope="module")
def expected(beer_posts):
    """What the output must hold, from the raw XML, without the code under test."""
    rows = [r.attrib for r in ET.parse(beer_posts).getroot()]
    questions = {r["Id"]: r for r in rows if r["PostTypeId"] == "1"}
    answers = [r for r in rows if r["PostTypeId"] == "2"]
    by_question = defaultdict(list)
    for a in answers:
        accepted = questions[a["ParentId"]].get("AcceptedAnswerId") == a["Id"]
        by_question[a["ParentId"]].append((int(a["Id"]), independent_score(int(a["Score"]), accepted)))
    pairs = {}
    for qid, group in by_question.items():
        differing = sum(1 for i, (_, s) in enumerate(group) for _, t in group[i + 1 :] if s != t)
        if differing:
            pairs[f"{SITE}:{qid}"] = min(10, differing)
    return {
        "rows": len(rows),
        "questions": len(questions),
        "answers": len(answers),
        "other": len(rows) - len(questions) - len(answers),
        "fewer_than_two": sum(1 for q in questions if len(by_question[q]) < 2),
        "with_two_or_more": sum(1 for q in questions if len(by_question[q]) >= 2),
        "pairs": pairs,
        "score_of": {aid: s for group in by_question.values() for aid, s in group},
    }


@pytest.fixture(scope="module")
def beer_output(beer_posts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beer") / "out"
    run_prepare_data(PrepareDataConfig(input=str(beer_posts), output=str(out)))
    return out


def read_all(out: Path) -> dict[str, list[dict]]:
    return {s: pq.read_table(out / f"{s}.parquet").to_pylist() for s in SUBSETS}


def test_source_md_counts_hold(expected):
    # SOURCE.md beside the dump documents these; the independent computation must agree with it first.
    assert (expected["rows"], expected["questions"], expected["answers"]) == (2354, 663, 1572)
    assert expected["with_two_or_more"] == 410


def test_stats_agree_with_independent_counts(beer_output, expected, beer_posts):
    stats = json.loads((beer_output / "stats.json").read_text())
    assert stats["posts_read"] == expected["rows"]
    assert stats["questions"] == expected["questions"]
    assert stats["answers"] == expected["answers"]
    assert stats["other_post_types"] == expected["other"] == 119  # 58 + 58 + 3
    assert stats["questions_skipped"]["fewer_than_two_answers"] == expected["fewer_than_two"]
    assert stats["questions_skipped"]["all_scores_equal"] == expected["with_two_or_more"] - len(expected["pairs"])
    assert stats["questions_paired"] == len(expected["pairs"])
    assert stats["pairs_total"] == sum(expected["pairs"].values())
    assert sum(stats["pairs_per_subset"].values()) == stats["pairs_total"]
    assert set(stats["rows_skipped"].values()) == {0} and set(stats["answers_skipped"].values()) == {0}
    assert stats["input_sha256"] == "37a93b290a79c20ee14127febfadb18e58a172e39f732f690512c1dac4da8777"
    assert stats["inputs"][0]["bytes"] == beer_posts.stat().st_size


def test_subsets_are_disjoint_and_cover_every_paired_question(beer_output, expected):
    tables = read_all(beer_output)
    qids = {s: {row["qid"] for row in rows} for s, rows in tables.items()}
    for i, a in enumerate(SUBSETS):
        assert qids[a], f"{a} is empty"
        for b in SUBSETS[i + 1 :]:
            assert not qids[a] & qids[b], (a, b)
    assert set().union(*qids.values()) == set(expected["pairs"])
    rows_per_question = defaultdict(int)
    for rows in tables.values():
        for row in rows:
            rows_per_question[row["qid"]] += 1
    assert rows_per_question == expected["pairs"]


def test_rows_are_ordered_scored_and_free_of_html(beer_output, expected):
    tag = re.compile(r"</?(?:p|a|img|pre|code|blockquote|ul|ol|li|em|strong|br|hr|h[1-6])\b[^>]*>")
    for rows in read_all(beer_output).values():
        for row in rows:
            assert row["site"] == SITE
            assert row["score_j"] > row["score_k"]
            assert row["score_j"] == expected["score_of"][row["answer_id_j"]]
            assert row["score_k"] == expected["score_of"][row["answer_id_k"]]
            for column in ("question", "response_j", "response_k"):
                assert row[column].strip()
                assert not tag.search(row[column]), (row["qid"], column, tag.search(row[column]).group(0))


def test_question_is_title_then_body(beer_output):
    rows = [r for rows in read_all(beer_output).values() for r in rows if r["qid"] == f"{SITE}:2"]
    assert rows and rows[0]["question"].startswith("When was the first beer ever brewed?\n\nAs far as we know,")


def test_loadable_with_datasets(beer_output):
    from datasets import load_dataset

    files = {s: str(beer_output / f"{s}.parquet") for s in SUBSETS}
    ds = load_dataset("parquet", data_files=files)
    stats = json.loads((beer_output / "stats.json").read_text())
    assert {s: ds[s].num_rows for s in SUBSETS} == stats["pairs_per_subset"]
    assert {"qid", "question", "response_j", "response_k", "score_j", "score_k", "answer_id_j", "answer_id_k"} <= set(
        ds["rl"].column_names
    )


def test_same_seed_same_output_other_seed_other_split(beer_posts, beer_output, tmp_path):
    again = tmp_path / "again"
    run_prepare_data(PrepareDataConfig(input=str(beer_posts), output=str(again)))
    assert read_all(again) == read_all(beer_output)
    other = tmp_path / "other"
    run_prepare_data(PrepareDataConfig(input=str(beer_posts), output=str(other), seed=7))
    first, second = read_all(beer_output), read_all(other)
    assert {r["qid"] for r in first["evaluation"]} != {r["qid"] for r in second["evaluation"]}


def test_caps_give_small_subsets(beer_posts, tmp_path):
    out = tmp_path / "capped"
    result = run_prepare_data(
        PrepareDataConfig(
            input=str(beer_posts),
            output=str(out),
            finetune_max_questions=5,
            reward_max_pairs=7,
            rl_max_pairs=40,
            evaluation_max_questions=3,
        )
    )
    assert (result.stage, result.status, result.output) == ("prepare_data", "prepared", str(out))
    stats = result.metrics
    tables = read_all(out)
    assert len({r["qid"] for r in tables["finetune"]}) == 5
    assert len(tables["reward"]) == 7  # the question that hits the cap contributes only part of its pairs
    assert len(tables["rl"]) == 40
    assert len({r["qid"] for r in tables["evaluation"]}) == 3
    assert stats["questions_skipped"]["over_subset_cap"] > 0
    assert stats["pairs_per_subset"] == {s: len(tables[s]) for s in SUBSETS}


def test_smollm2_recipe_gives_the_capped_subsets(beer_posts, tmp_path, run_cli):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "smollm2" / "prepare_data.yaml"
    result = run_cli("-c", recipe, "--input", beer_posts, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["pairs_per_subset"] == {
        "finetune": 256,
        "reward": 256,
        "rl": 128,
        "evaluation": 64,
    }
