"""What `rlhf run` reports at the end: the summary (step times, metrics, registered versions, paths) and its
tables on the console."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rlhf_pipeline.orchestration.headline import evaluated_models, gate_line, headline_rows
from rlhf_pipeline.orchestration.mlflow_filter import equals
from rlhf_pipeline.orchestration.run_config import LocalRunConfig
from rlhf_pipeline.orchestration.run_console import StepTimer
from rlhf_pipeline.secrets import redact


def _latest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def collect_summary(
    cfg: LocalRunConfig,
    out: Path,
    run_dir: Path | None,
    pipeline_root: Path,
    timer: StepTimer,
    total: float,
    log_path: Path,
) -> dict[str, Any]:
    from rlhf_pipeline.orchestration import steps

    metrics: dict[str, dict[str, Any]] = {}
    challenger = None
    if run_dir is not None:
        for step in ("sft", "reward", "judge", *cfg.alignments(), "evaluate"):
            raw = steps.read_metrics(run_dir / step)
            metrics[step] = steps.namespaced(steps.STEP_STAGES.get(step, step), steps.flat_metrics(raw))
            if step == "evaluate" and raw is not None:
                challenger = raw.metrics.get("challenger")
        if (run_dir / "evaluate" / "frontier.png").is_file():  # next to report.md, which embeds it
            shutil.copy2(run_dir / "evaluate" / "frontier.png", out / "frontier.png")
    report_md = _latest("*/report*/report_md", pipeline_root)
    report_html = _latest("*/report*/report_html", pipeline_root)
    paths = {}
    if report_md is not None:
        shutil.copy2(report_md, out / "report.md")
        paths["report_md"] = str(out / "report.md")
    if report_html is not None:
        shutil.copy2(report_html, out / "report.html")
        paths["report_html"] = str(out / "report.html")
    versions = registered_versions(cfg, run_dir.name if run_dir else None)
    timings = {timer.label(t): round(d, 1) for t, d in timer.durations.items()}
    cpu = {timer.label(t): round(c, 1) for t, c in timer.cpu.items()}
    return {
        "alignment": cfg.alignment,
        "run": run_dir.name if run_dir else None,
        "total_seconds": round(total, 1),
        "step_seconds": timings,
        "step_cpu_seconds": cpu,
        "metrics": metrics,
        "challenger": challenger,
        "registered": versions,
        "tracking_uri": redact(cfg.tracking()),  # printed and written to summary.json: no password
        "work_dir": str(run_dir) if run_dir else None,
        "log": str(log_path),
        **paths,
    }


def registered_versions(cfg: LocalRunConfig, run_key: str | None) -> list[dict[str, Any]]:
    if not run_key:
        return []
    from rlhf_pipeline import tracking

    client = tracking.client(cfg.tracking())
    rows = []
    for stage in ("sft", "reward", "judge", "policy"):
        name = f"{cfg.registered_model_prefix}-{stage}"
        try:
            found = client.search_model_versions(equals({"name": name, "tags.kfp_run_id": run_key}))
        except Exception:  # noqa: BLE001 (a missing model is just not listed)
            found = []
        for mv in sorted(found, key=lambda v: int(v.version)):
            mv = client.get_model_version(mv.name, mv.version)  # search results carry no aliases
            rows.append(
                {
                    "name": mv.name,
                    "version": str(mv.version),
                    "aliases": list(mv.aliases or []),
                    "tags": dict(mv.tags or {}),
                }
            )
    return rows


HEADLINE = [
    ("RM accuracy", "reward", "rm/accuracy"),
    ("judge accuracy (held-out judge pairs)", "judge", "rm/accuracy"),
    ("eval proxy reward (challenger)", "evaluate", "eval/reward_mean"),
    ("eval KL (challenger‖SFT)", "evaluate", "eval/kl"),
    ("eval proxy win-rate vs SFT", "evaluate", "eval/win_rate"),
    ("eval judge win-rate vs SFT", "evaluate", "eval/judge_win_rate"),
]
# Per policy in the console's side-by-side table: (column, metric under eval/<policy>/)
POLICY_COLUMNS = [
    ("judge win-rate", "judge_win_rate"),
    ("95% CI", None),
    ("judge LC", "judge_win_rate_lc"),
    ("proxy win-rate", "win_rate"),
    ("judge reward", "judge_reward_mean"),
    ("KL", "kl"),
    ("length", "response_length"),
]


def print_headline(summary: dict[str, Any], console) -> None:
    """'Did it help?': each policy next to SFT (judge win-rate [CI], n, wins/ties/losses) and the gate verdict."""
    from rich.table import Table

    rows = headline_rows(summary["metrics"].get("evaluate", {}))
    if not rows:
        return
    t = Table(title="Did it help? Policy vs SFT on held-out questions", show_header=True)
    for col in ("policy", "n", "win-rate vs SFT [95% CI]", "wins / ties / losses", "proxy win-rate", "KL"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        mark = " (challenger)" if r["model"] == summary.get("challenger") else ""
        ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
        rate = f"{r['win_rate']:.2f}{ci} {'judge' if r['judged'] else 'proxy'}"
        wtl = f"{r['wins']:.0f} / {r['ties']:.0f} / {r['losses']:.0f}" if r["wins"] is not None else "n/a"
        proxy = f"{r['proxy_win_rate']:.2f}" if r["proxy_win_rate"] is not None else "n/a"
        kl = f"{r['kl']:.3f}" if r["kl"] is not None else "n/a"
        t.add_row(r["model"] + mark, str(r["n"]), rate, wtl, proxy, kl)
    console.print(t)
    console.print(gate_line(summary.get("gates")).replace("`", ""))


def print_policy_table(evaluated: dict[str, float], console) -> None:
    """Every evaluated model side by side (the judge's columns first)."""
    from rich.table import Table

    names = evaluated_models(evaluated)
    if not names:
        return
    t = Table(title="Evaluation vs SFT", show_header=True)
    t.add_column("model")
    for label, _ in POLICY_COLUMNS:
        t.add_column(label, justify="right")
    for name in names:
        row = []
        for _, key in POLICY_COLUMNS:
            if key is None:
                low, high = evaluated.get(f"eval/{name}/judge_win_low"), evaluated.get(f"eval/{name}/judge_win_high")
                row.append(f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "n/a")
            else:
                value = evaluated.get(f"eval/{name}/{key}")
                row.append(f"{value:.3f}" if isinstance(value, float) else "n/a")
        t.add_row(name, *row)
    console.print(t)


def print_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    print_headline(summary, console)

    t = Table(title="Step times", show_header=True)
    t.add_column("step")
    t.add_column("wall s", justify="right")
    t.add_column("CPU s", justify="right")
    cpu = summary.get("step_cpu_seconds", {})
    for step, secs in summary["step_seconds"].items():
        t.add_row(step, f"{secs:.1f}", f"{cpu[step]:.1f}" if step in cpu else "")
    t.add_row("[bold]total[/]", f"[bold]{summary['total_seconds']:.1f}[/]", f"{sum(cpu.values()):.1f}")
    console.print(t)

    m = summary["metrics"]
    t = Table(title="Results", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for label, step, key in HEADLINE:
        value = m.get(step, {}).get(key)
        t.add_row(label, f"{value:.4g}" if isinstance(value, float) else "n/a")
    for align in ["ppo", "dpo"] if summary["alignment"] == "both" else [summary["alignment"]]:
        for key, value in sorted(m.get(align, {}).items()):
            if any(w in key for w in ("reward", "kl", "loss", "accuracy", "margin")):
                t.add_row(key, f"{value:.4g}")
    console.print(t)
    print_policy_table(m.get("evaluate", {}), console)

    if summary["registered"]:
        t = Table(title="Registered model versions (MLflow)", show_header=True)
        for col in ("model", "version", "aliases", "lineage"):
            t.add_column(col)
        for v in summary["registered"]:
            lineage = " ".join(
                f"{k}={str(v['tags'][k])[:10]}" for k in ("data_hash", "git_commit", "config_hash") if k in v["tags"]
            )
            t.add_row(v["name"], v["version"], ",".join(v["aliases"]), lineage)
        console.print(t)
    for label, text in mlflow_ui_lines(summary):
        console.print(f"{label:<11} [bold]{text}[/]")
    if summary.get("report_md"):
        console.print(f"Report:     {summary['report_md']}  ({summary.get('report_html', '')})")
    console.print(f"Outputs:    {summary['work_dir']}")
    console.print(f"Log:        {summary['log']}")


def mlflow_ui_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Where to look in MLflow: the parent run's page and, for a local store, the command that serves it (this
    interpreter's `-m mlflow`: the venv's `mlflow` script is not on PATH unless the venv is activated)."""
    import shlex
    import sys

    lines = []
    uri = summary["tracking_uri"]
    if not uri.startswith(("http://", "https://")):
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", "5000"]
        lines.append(("MLflow UI:", shlex.join(command)))
    if summary.get("mlflow_run_url"):
        lines.append(("MLflow run:", summary["mlflow_run_url"]))
    return lines
