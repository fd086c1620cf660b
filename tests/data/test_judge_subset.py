"""The judge subset: held out on its own questions, disjoint from the four others, and holding it out leaves every
question that stays in another subset where it was (the judge's share sits last on [0, 1))."""

from __future__ import annotations

import pyarrow.parquet as pq

from rlhf_pipeline.data.config import PrepareDataConfig
from rlhf_pipeline.data.prepare import run_prepare_data
from rlhf_pipeline.data.subsets import read_questions

OTHERS = ("finetune", "reward", "rl", "evaluation")


def _qids(out, subset: str) -> set[str]:
    return set(pq.read_table(out / f"{subset}.parquet", columns=["qid"]).column("qid").to_pylist())


def test_judge_questions_are_disjoint_and_move_no_other_question(beer_posts, tmp_path):
    fractions = {"finetune_fraction": 0.25, "reward_fraction": 0.25, "rl_fraction": 0.25, "evaluation_fraction": 0.1}
    without = tmp_path / "without"
    run_prepare_data(PrepareDataConfig(input=str(beer_posts), output=str(without), **fractions))
    with_judge = tmp_path / "with"
    result = run_prepare_data(
        PrepareDataConfig(input=str(beer_posts), output=str(with_judge), judge_fraction=0.15, **fractions)
    )
    judge = _qids(with_judge, "judge")
    assert len(judge) == result.metrics["questions_per_subset"]["judge"] > 20
    for subset in OTHERS:
        assert not judge & _qids(with_judge, subset)
        assert _qids(with_judge, subset) == _qids(without, subset)  # the same split for the four others
    assert _qids(without, "judge") == set()  # default: no judge questions
    assert len(read_questions(with_judge, "judge", None, 0)) == len(judge)
