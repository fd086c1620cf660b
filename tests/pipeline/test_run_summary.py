"""`rlhf run`'s closing tables: every evaluated model side by side with the judge's columns."""

from __future__ import annotations

import io

from rich.console import Console

from rlhf_pipeline.orchestration.run_summary import print_policy_table


def test_policy_table_lists_every_model_with_the_judge_interval():
    evaluated = {
        "eval/ppo/judge_win_rate": 0.625,
        "eval/ppo/judge_win_low": 0.53,
        "eval/ppo/judge_win_high": 0.71,
        "eval/ppo/win_rate": 0.7,
        "eval/ppo/kl": 1.25,
        "eval/dpo/judge_win_rate": 0.5,
        "eval/dpo/kl": 0.3,
        "eval/best_of_n/4/kl": 0.6,  # the baseline has its own table in the report
        "eval/judge_win_rate": 0.625,  # the challenger's flat value: not a model
    }
    out = io.StringIO()
    print_policy_table(evaluated, Console(file=out, width=200))
    text = out.getvalue()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert set(rows) - {"model"} == {"dpo", "ppo"}
    assert "0.625" in rows["ppo"] and "[0.530, 0.710]" in rows["ppo"] and "1.250" in rows["ppo"]
    assert "n/a" in rows["dpo"]  # no interval recorded for dpo here
