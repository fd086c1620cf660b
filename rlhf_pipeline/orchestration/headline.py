"""The run's answer to "did it help?": each policy next to SFT (n questions, judge win-rate with its 95 % interval,
wins/ties/losses) and the promotion gates' verdict on the challenger; shared by the console summary
(run_summary.py) and the run report (report.py). Pure functions over the evaluation's flat metrics."""

from __future__ import annotations

from typing import Any

MODEL_COLUMNS = ("reward_mean", "win_rate", "kl", "judge_win_rate")  # what every evaluated model has (one of)


def evaluated_models(evaluated: dict[str, float]) -> list[str]:
    """The models the evaluation scored (those with an `eval/<name>/<MODEL_COLUMNS>` value), SFT first: not
    `eval/rm/accuracy` (the reward model's accuracy the evaluation passes on) nor `eval/best_of_n/...`."""
    names = {k.split("/")[1] for k in evaluated if k.startswith("eval/") and k.count("/") == 2}
    names = {n for n in names if n != "best_of_n" and any(f"eval/{n}/{c}" in evaluated for c in MODEL_COLUMNS)}
    return sorted(names, key=lambda n: (n != "sft", n))


def headline_rows(evaluated: dict[str, float]) -> list[dict[str, Any]]:
    """Per policy vs SFT: n questions, judge win-rate with its 95 % interval and wins/ties/losses (the proxy's
    win-rate where no judge scored), proxy win-rate, KL."""
    rows = []
    for name in evaluated_models(evaluated):
        if name == "sft":
            continue
        get = lambda key, name=name: evaluated.get(f"eval/{name}/{key}")  # noqa: E731
        judged = get("judge_win_rate") is not None
        rows.append(
            {
                "model": name,
                "n": int(get("n") or evaluated.get("eval/num_questions") or 0),
                "judged": judged,
                "win_rate": get("judge_win_rate") if judged else get("win_rate"),
                "low": get("judge_win_low"),
                "high": get("judge_win_high"),
                "wins": get("judge_wins"),
                "ties": get("judge_ties"),
                "losses": get("judge_losses"),
                "proxy_win_rate": get("win_rate"),
                "kl": get("kl"),
            }
        )
    return rows


def gate_line(gates: dict[str, Any] | None) -> str:
    """The promotion gates' verdict on the challenger version in one line: PASS, or FAIL and which gates."""
    if not gates:
        return "Promotion gates: not checked (no registered challenger version)"
    failed = [r for r in gates["results"] if not r["passed"]]
    what = f"Promotion gates (`rlhf promote`, {gates['gates_file']}) on {gates['model']} v{gates['version']}: "
    if not failed:
        return what + "PASS"

    def why(r: dict[str, Any]) -> str:
        if r["value"] is None:
            return f"{r['gate']} missing"
        if r["threshold"] is None:
            return f"{r['gate']} {r['value']:.3f} ({r['source']})"
        return f"{r['gate']} {r['value']:.3f} {'<' if r['op'] == '>=' else '>'} {r['threshold']:.3f}"

    return what + "FAIL: " + "; ".join(why(r) for r in failed)
