"""Run our stages and the TRL peers side by side (sequentially, one process per side) and print ours / TRL ratios.

    .venv/bin/python bench/run_all.py                     # full run (~35-40 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick             # few steps, peers' default TRL configs only
    .venv/bin/python bench/run_all.py --only sft,reward --variants default
    .venv/bin/python bench/run_all.py --only ppo --skip-ours   # validate the TRL side alone

Needs the TRL venvs from `bash bench/setup_peers.sh` (benchmark-only; TRL is not a project dependency).
Writes <out>/results.json (every side's raw JSON + machine + load), <out>/table.md and <out>/logs/*.log.
See docs/benchmarks.md for what is compared and the measured figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

STAGES = ("sft", "reward", "dpo", "ppo")  # ppo last: it reuses the reward model trained by the reward bench


def stage_module(name: str):
    import importlib

    return importlib.import_module(f"bench_{name}")


def legacy_checkpoint(model_dir: str) -> str:
    """transformers-4.46-readable view of OUR embedded checkpoint (symlinks to the same safetensors)."""
    dst = bl.PEERS_HOME / "smollm2-embedded-legacy"
    subprocess.run(
        [sys.executable, str(bl.peers_dir() / "make_legacy_checkpoint.py"), "--src", model_dir, "--dst", str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    return str(dst)


def git_state() -> dict:
    """The commit measured, and whether the library had uncommitted changes (stages still being edited)."""

    def git(*args):
        out = subprocess.run(["git", *args], cwd=bl.REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "rlhf_pipeline")
    return {"commit": git("rev-parse", "--short", "HEAD"), "library_dirty": sorted(dirty.splitlines()) if dirty else []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        default=",".join(STAGES),
        help=f"comma list of {', '.join(STAGES)}, run in that order (ppo always after reward)",
    )
    ap.add_argument("--quick", action="store_true", help="few steps per side (a smoke run, not a measurement)")
    ap.add_argument(
        "--variants",
        choices=["all", "default"],
        default=None,
        help="TRL configurations: all (the best one is the denominator; default for a full run) or "
        "default (the peers' default config only; default with --quick)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the peers' step counts (e.g. 0.5 on a busy machine; >= 3 steps each)",
    )
    ap.add_argument(
        "--steps",
        default="",
        metavar="STAGE=N,...",
        help="step count per stage, e.g. 'ppo=2,sft=3' (overrides --quick/--scale; N >= 2)",
    )
    ap.add_argument("--out", default=None, help="results dir (default outputs/bench/<timestamp>)")
    ap.add_argument(
        "--data-dir", default=None, help="where the converted peer data is cached (default outputs/bench/data)"
    )
    ap.add_argument(
        "--select",
        default=None,
        help="regex on side names: run only the matching sides (e.g. 'ours_sft$|trl_sft_unpacked')",
    )
    ap.add_argument("--skip-trl", action="store_true", help="run only our side")
    ap.add_argument("--skip-ours", action="store_true", help="run only the TRL side")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per side before it is killed")
    ap.add_argument(
        "--render",
        default=None,
        metavar="RESULTS_JSON",
        help="only print the tables of an earlier (possibly interrupted) run's results.json",
    )
    a = ap.parse_args(argv)
    if a.render:
        report = json.loads(Path(a.render).read_text())
        rows = []
        for stage, results in report["stages"].items():  # recomputed: picks up fixes to the summaries
            for r in results:
                if r.get("role") == "trl":
                    bl.refine_trl_rates(r)
            rows += stage_module(stage).rows(results, None)
        report["rows"] = rows
        print(render(report))
        return 0

    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in STAGES]
    if bad:
        ap.error(f"--only: unknown stage(s) {', '.join(bad)} (choose from {', '.join(STAGES)})")
    # the order given is the run order (measure what matters first on a busy machine), but ppo comes after
    # reward: it reuses the reward model the reward benchmark trains
    only = list(dict.fromkeys(only))
    if "ppo" in only and "reward" in only and only.index("ppo") < only.index("reward"):
        only.remove("ppo")
        only.insert(only.index("reward") + 1, "ppo")
    variants = a.variants or ("default" if a.quick else "all")
    # absolute: our stages get a sqlite:/// tracking URI under it (a relative one breaks MLflow's artifact URI)
    out = Path(a.out or bl.REPO / "outputs" / "bench" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if not a.skip_trl and not bl.peer_python().exists():
        sys.exit(f"bench: no TRL venv at {bl.peer_python()}; run `bash bench/setup_peers.sh` (or --skip-trl)")

    import peer_data

    from rlhf_pipeline.modeling.loading import ensure_embedded_model

    model_dir = str(ensure_embedded_model())
    data_dir, data_info = peer_data.prepare(Path(a.data_dir or bl.REPO / "outputs" / "bench" / "data"), model_dir)
    legacy = None
    if "ppo" in only and not a.skip_trl and bl.legacy_python().exists():
        legacy = legacy_checkpoint(model_dir)
    ctx = bl.Ctx(out, model_dir, data_dir, a.quick, variants, legacy_model_dir=legacy, scale=a.scale)
    for item in filter(None, a.steps.split(",")):
        name, _, n = item.partition("=")
        if name not in STAGES or not n.isdigit() or int(n) < 2:
            ap.error(f"--steps: expected STAGE=N with N >= 2, got {item!r}")
        ctx.steps_override[name] = int(n)

    report = {
        "machine": bl.machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_at_start": bl.loadavg(),
        "quick": a.quick,
        "scale": a.scale,
        "variants": variants,
        "model_dir": model_dir,
        "legacy_model_dir": legacy,
        "data": data_info,
        "stages": {},
        "rows": [],
        "git": git_state(),
        "steps_override": dict(ctx.steps_override),
    }
    if legacy is None and "ppo" in only and not a.skip_trl:
        report["notes"] = [f"no legacy venv at {bl.legacy_python()}: classic PPOTrainer not measured"]
    results_path = out / "results.json"

    all_rows = []
    for stage in only:
        mod = stage_module(stage)
        ctx.stage = stage
        sides = mod.plan(ctx)
        if a.skip_trl:
            sides = [s for s in sides if s["role"] != "trl"]
        if a.skip_ours:
            sides = [s for s in sides if s["role"] == "trl"]
        if a.select:
            import re

            sides = [s for s in sides if s["role"] == "setup" or re.search(a.select, s["name"])]
        results = bl.run_plan(ctx, sides, timeout=a.timeout)
        try:
            rows = mod.rows(results, ctx)
        except Exception as exc:  # noqa: BLE001 -- a summary bug must not lose the remaining stages
            print(f"[bench] {stage}: summary failed ({exc!r}); raw results kept", file=sys.stderr)
            rows = []
        all_rows += rows
        report["stages"][stage] = results
        report["rows"] = all_rows
        results_path.write_text(json.dumps(report, indent=2, default=str) + "\n")  # after every stage
        (out / "table.md").write_text(render(report) + "\n")

    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["load_at_end"] = bl.loadavg()
    results_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render(report)
    (out / "table.md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {results_path}", file=sys.stderr)
    failed = [r["side"] for st in report["stages"].values() for r in st if r.get("failed")]
    if failed:
        print(f"bench: failed sides: {', '.join(failed)} (see {ctx.log_dir})", file=sys.stderr)
        return 1
    return 0


RATE_KEYS = ("tokens_per_s", "pairs_per_s", "samples_per_s")


def side_rate(r: dict) -> str:
    if r.get("failed"):
        return "FAILED"
    if r["role"] == "ours":
        m = r.get("metrics") or {}
        for k in RATE_KEYS:
            for key in (k, f"{r.get('stage')}/{k}", f"rm/{k}", f"ppo/{k}", f"dpo/{k}"):
                if m.get(key) is not None:
                    return f"{m[key]:.3f} {k.removesuffix('_per_s')}/s"
        return "-"
    for k in ("samples_per_s", "pairs_per_s", "tokens_per_s"):
        if r.get(k) is not None:
            return f"{r[k]} {k.removesuffix('_per_s')}/s"
    return "-"


def side_steps(r: dict) -> str:
    if r["role"] == "ours":
        m = r.get("metrics") or {}
        times = [
            1 / h["samples_per_s"] * (r.get("config_used") or {}).get("batch_size", 1)
            for h in m.get("history") or []
            if h.get("samples_per_s")
        ]  # PPO keeps a per-step history
        steps = m.get("steps")
        if times:
            return f"{len(times)} steps, {sum(times[1:]) / max(len(times) - 1, 1):.1f} s/step"
        if m.get("train_seconds") and steps:
            return f"{steps} steps, {m['train_seconds'] / steps:.1f} s/step incl. warmup"
        return str(steps or "-")
    return f"{r.get('steps')} steps, {r.get('s_per_step')} s/step"


def render(report: dict) -> str:
    rows = report["rows"]
    m = report["machine"]
    mode = "quick" if report["quick"] else f"full, step scale {report.get('scale', 1.0)}"
    if report.get("steps_override"):
        mode += ", steps " + ",".join(f"{k}={v}" for k, v in report["steps_override"].items())
    git = report.get("git") or {}
    md = [
        f"# bench {report['started']} ({mode}, TRL variants: {report['variants']})",
        "",
        f"machine: {m.get('cpu')}, {m['cpu_count']} cores, {m.get('mem_total_gib')} GiB, torch threads "
        f"{m['threads']}; load average at start {report['load_at_start']}"
        + (f", at end {report['load_at_end']}" if report.get("load_at_end") else "")
        + (f"; commit {git.get('commit')}" if git.get("commit") else "")
        + (f" (uncommitted library files: {', '.join(git['library_dirty'])})" if git.get("library_dirty") else ""),
        "",
        bl.markdown_table(rows),
        "",
        "| side | config | steady rate | steps | load before (1/5/15 min) | mean cores | peak RSS MiB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for results in report["stages"].values():
        for r in results:
            md.append(
                f"| {r['side']} | {r.get('config', '')} | {side_rate(r)} | {side_steps(r)} | "
                f"{'/'.join(str(x) for x in r['load_before'])} | {r.get('mean_cores')} | "
                f"{bl.fmt(r.get('peak_rss_mib_wait4'), 0)} | {r.get('wall_s')} |"
            )
    missing = {
        r["side"]: r.get("missing_knobs") for st in report["stages"].values() for r in st if r.get("missing_knobs")
    }
    if missing:
        md += ["", "knobs our stage configs lack (stage default used): " + json.dumps(missing)]
    notes = [f"{r['stage']}: {r['note']}" for r in rows if r.get("note")] + report.get("notes", [])
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
