"""'Did it help?': the console summary and the run report open with each policy next to SFT (n, judge win-rate
with its interval, wins/ties/losses) and the gates' verdict; the evaluation table lists evaluated models only."""

from __future__ import annotations

import io

from rich.console import Console

from rlhf_pipeline.orchestration.headline import evaluated_models, gate_line, headline_rows
from rlhf_pipeline.orchestration.report import render_markdown
from rlhf_pipeline.orchestration.run_summary import print_summary

# the evaluate step's metrics as run_summary reads them (namespaced flat metrics.json)
EVALUATED = {
    "eval/num_questions": 16.0,
    "eval/rm/accuracy": 0.68,  # the reward model's accuracy, passed on: not a model row
    "eval/reward_mean": 0.3,  # the challenger's flat gate values: not a model row
    "eval/best_of_n/2/reward_mean": 0.2,
    **{f"eval/sft/{k}": v for k, v in {"reward_mean": 0.0, "win_rate": 0.5, "kl": 0.0, "n": 16.0}.items()},
    **{
        f"eval/ppo/{k}": v
        for k, v in {
            "reward_mean": 0.3,
            "win_rate": 0.625,
            "kl": 0.042,
            "n": 16.0,
            "judge_win_rate": 0.5625,
            "judge_win_low": 0.33,
            "judge_win_high": 0.77,
            "judge_wins": 8.0,
            "judge_ties": 2.0,
            "judge_losses": 6.0,
            "response_length": 30.0,
        }.items()
    },
}
GATES = {
    "model": "rlhf-policy",
    "version": "3",
    "gates_file": "ops/default_gates.yaml",
    "results": [
        {"gate": "rm/accuracy", "value": 0.68, "op": ">=", "threshold": 0.6, "passed": True, "source": "tag"},
        {"gate": "eval/kl", "value": 0.042, "op": "<=", "threshold": 10.0, "passed": True, "source": "tag"},
        {"gate": "eval/win_rate", "value": 0.5, "op": ">=", "threshold": 0.55, "passed": False, "source": "tag"},
    ],
}


def test_rows_are_the_evaluated_policies_only():
    assert evaluated_models(EVALUATED) == ["sft", "ppo"]
    (row,) = headline_rows(EVALUATED)
    assert row == {
        "model": "ppo",
        "n": 16,
        "judged": True,
        "win_rate": 0.5625,
        "low": 0.33,
        "high": 0.77,
        "wins": 8.0,
        "ties": 2.0,
        "losses": 6.0,
        "proxy_win_rate": 0.625,
        "kl": 0.042,
    }


def test_gate_line_says_which_gate_failed():
    assert gate_line(GATES) == (
        "Promotion gates (`rlhf promote`, ops/default_gates.yaml) on rlhf-policy v3: FAIL: eval/win_rate 0.500 < 0.550"
    )
    passing = {**GATES, "results": [dict(r, passed=True) for r in GATES["results"]]}
    assert gate_line(passing).endswith("rlhf-policy v3: PASS")
    assert gate_line(None) == "Promotion gates: not checked (no registered challenger version)"


def _console_text(summary) -> str:
    out = io.StringIO()
    print_summary(summary, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def test_console_opens_with_policy_vs_sft_and_the_verdict():
    summary = {
        "alignment": "ppo",
        "step_seconds": {"sft": 10.0},
        "step_cpu_seconds": {"sft": 9.0},
        "total_seconds": 10.0,
        "metrics": {"evaluate": EVALUATED},
        "challenger": "ppo",
        "gates": GATES,
        "registered": [],
        "tracking_uri": "sqlite:///x.db",
        "work_dir": "/w",
        "log": "/w/log",
    }
    text = _console_text(summary)
    assert text.index("Did it help?") < text.index("Step times")
    (line,) = [row for row in text.splitlines() if "ppo (challenger)" in row]
    for cell in ("16", "0.56 [0.33, 0.77] judge", "8 / 2 / 6", "0.62", "0.042"):
        assert cell in line, line
    assert "FAIL: eval/win_rate 0.500 < 0.550" in text
    # the side-by-side evaluation table: sft and ppo, no `rm` row of n/a values
    table = text[text.index("Evaluation vs SFT") :]
    names = [row.split()[1] for row in table.splitlines() if row.startswith("│")]
    assert names == ["sft", "ppo"], names


def test_report_opens_with_the_headline():
    md = render_markdown(
        title="RLHF pipeline report (ppo)",
        alignment="ppo",
        metrics=EVALUATED,
        versions=[],
        generations=[],
        gates=GATES,
        challenger="ppo",
    )
    lines = md.splitlines()
    assert lines.index("## Did it help?") < lines.index("## Headline metrics")
    assert "| ppo (challenger) | 16 | 0.562 [0.330, 0.770] (judge) | 8 / 2 / 6 | 0.625 | 0.042 |" in lines
    assert gate_line(GATES) in lines
