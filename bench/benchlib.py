"""Shared helpers for the TRL comparison benchmarks (paths, subprocesses, peak RSS, load, tables).

Every measured side (one of OUR stages, or one TRL peer script) runs in its OWN subprocess, one at a time, so
that peak memory (ru_maxrss of that process, from os.wait4) and CPU are not shared. Each subprocess prints exactly
one JSON line on stdout (its result); everything else goes to a log file.

Environment:
  PEERS_HOME        where setup_peers.sh put the TRL venvs (default ~/.cache/rlhf-peers)
  PEERS_DIR         the shared TRL peer scripts (default: ../shared/bench-peers beside the project, else
                    $RLHF_SHARED_DIR/bench-peers)
  BENCH_THREADS     torch threads for both sides (default 2, like the peers)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_HOME = Path(os.environ.get("PEERS_HOME") or Path.home() / ".cache" / "rlhf-peers")
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
# the data set the peers document (make_data.py defaults: 256 train + 64 eval, seed 1234)
PEER_DATA_SHA256 = "9295eef54d1aa2b493349103ad3b49af41efe52c733ae19b97ab416d633852ca"


def peers_dir() -> Path:
    cands = []
    if os.environ.get("PEERS_DIR"):
        cands.append(Path(os.environ["PEERS_DIR"]))
    if os.environ.get("RLHF_SHARED_DIR"):
        cands.append(Path(os.environ["RLHF_SHARED_DIR"]) / "bench-peers")
    cands += [REPO.parent / "shared" / "bench-peers", REPO / ".." / "shared" / "bench-peers"]
    for c in cands:
        if (c / "peer_common.py").is_file():
            return c.resolve()
    raise SystemExit(f"bench: TRL peer scripts not found (tried {', '.join(map(str, cands))}); set PEERS_DIR")


def peer_python() -> Path:
    return Path(os.environ.get("VENV") or PEERS_HOME / "venv") / "bin" / "python"


def legacy_python() -> Path:
    return Path(os.environ.get("LEGACY_VENV") or PEERS_HOME / "venv-legacy") / "bin" / "python"


def machine_info() -> dict:
    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split()
                info["avx512_bf16"] = "avx512_bf16" in flags
                info["amx"] = "amx_bf16" in flags
                break
    except OSError:
        pass
    try:
        info["mem_total_gib"] = round(int(open("/proc/meminfo").readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_side(
    name: str,
    cmd: list[str],
    log_dir: Path,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> dict:
    """Run one measured side in its own process; return its JSON line + peak RSS, wall time and load.

    Peak RSS comes from os.wait4 (ru_maxrss of that child alone, KiB on Linux) so both sides are measured the
    same way whatever they report themselves.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.json", log_dir / f"{name}.log"
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(THREADS),
        "PEER_THREADS": str(THREADS),
        **(env or {}),
    }
    load_before = loadavg()
    print(f"[bench] {name}: {' '.join(map(str, cmd))}  (load {load_before[0]})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fo, stderr=fe, env=full_env, cwd=cwd)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    res: dict = {}
    lines = [line for line in out_path.read_text().splitlines() if line.strip().startswith("{")]
    if lines:
        try:
            res = json.loads(lines[-1])
        except json.JSONDecodeError:
            res = {}
    res.update(
        {
            "side": name,
            "rc": rc,
            "wall_s": round(wall, 1),
            "load_before": load_before,
            "load_after": loadavg(),
            "peak_rss_mib_wait4": round(rusage.ru_maxrss / 1024.0, 1),
            # CPU seconds of the process and the mean cores it got: < THREADS means it was starved by load
            "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1),
            "mean_cores": round((rusage.ru_utime + rusage.ru_stime) / wall, 2) if wall > 0 else None,
            "log": str(err_path),
        }
    )
    if rc != 0 or not lines:
        res["failed"] = True
        res["stderr_tail"] = "".join(err_path.read_text(errors="replace").splitlines(True)[-15:])
        print(f"[bench] {name} FAILED rc={rc} (see {err_path})\n{res['stderr_tail']}", file=sys.stderr, flush=True)
    else:
        print(
            f"[bench] {name} ok ({wall:.0f} s, {res['mean_cores']} cores on average, peak RSS "
            f"{res['peak_rss_mib_wait4']:.0f} MiB)",
            file=sys.stderr,
            flush=True,
        )
    return res


def ratio(ours, theirs):
    if ours is None or theirs is None or not theirs:
        return None
    return round(float(ours) / float(theirs), 2)


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 and nd >= 2 else f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """rows: {stage, metric, ours, trl, trl_side, ratio, goal, ours_rss, trl_rss, note}."""
    head = (
        "| stage | metric | ours | TRL (best measured config) | ours / TRL | goal | peak RSS ours / TRL MiB |"
        "\n|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        goal = r.get("goal")
        met = ""
        if goal and r.get("ratio") is not None:
            met = " (met)" if r["ratio"] >= goal else " (NOT met)"
        out.append(
            f"| {r['stage']} | {r['metric']} | {fmt(r.get('ours'))} | {fmt(r.get('trl'))} "
            f"[{r.get('trl_side', '')}] | **{fmt(r.get('ratio'))}x**{met} | "
            f"{'>= ' + fmt(goal, 1) + 'x' if goal else '-'} | "
            f"{fmt(r.get('ours_rss'), 0)} / {fmt(r.get('trl_rss'), 0)} |"
        )
    return "\n".join(out)


def best(sides: list[dict], key: str) -> dict | None:
    ok = [s for s in sides if not s.get("failed") and s.get(key) is not None]
    return max(ok, key=lambda s: s[key]) if ok else None


# ---------------------------------------------------------------------------------------------------------------
# Plans: each bench_<stage>.py returns a list of sides; run_all.py runs them one after the other.
# ---------------------------------------------------------------------------------------------------------------


class Ctx:
    """What every stage plan needs: the model, the data, where to write, quick/full, which TRL variants."""

    def __init__(
        self,
        out: Path,
        model_dir: str,
        data_dir: Path,
        quick: bool,
        variants: str,
        legacy_model_dir: str | None = None,
        scale: float = 1.0,
    ):
        self.out, self.model_dir, self.data_dir = Path(out), model_dir, Path(data_dir)
        self.quick, self.variants, self.scale = quick, variants, scale
        self.steps_override: dict[str, int] = {}
        self.stage: str | None = None  # set by run_all before each stage's plan()
        self.legacy_model_dir = legacy_model_dir
        self.log_dir = self.out / "logs"
        self.tracking_uri = f"sqlite:///{self.out / 'mlflow' / 'mlflow.db'}"

    def steps(self, full: int, quick: int) -> int:
        """The peers' step count (full), or a few (quick); --scale shortens a full run (at least 3 steps);
        --steps STAGE=N sets it outright (N >= 2: the first step is always left out of the steady rate)."""
        if self.stage in self.steps_override:
            return self.steps_override[self.stage]
        return quick if self.quick else max(3, round(full * self.scale))


def trl_side(
    ctx: Ctx, name: str, script: str, args: list, legacy: bool = False, attention: str | None = None, **meta
) -> dict:
    """A shared peer script; `attention` runs it through trl_attention.py with that attention implementation."""
    py = legacy_python() if legacy else peer_python()
    model = ctx.legacy_model_dir if legacy else ctx.model_dir
    wrapper = [BENCH_DIR / "trl_attention.py", attention] if attention else []
    cmd = [py, *wrapper, peers_dir() / script, "--model", model, *args]
    return {"name": name, "role": "trl", "cmd": cmd, "cwd": peers_dir(), **meta}


def ours_side(ctx: Ctx, name: str, stage: str, want: dict, **meta) -> dict:
    """`want` = config knobs (see ours_worker.py); model/data/output/tracking are filled in here."""
    import shutil

    output = ctx.out / "ours" / name
    base = {
        "model": ctx.model_dir,
        "data": str(ctx.data_dir),
        "output": str(output),
        "seed": 0,
        "register_model": False,
        "tracking_uri": ctx.tracking_uri,
        "run_name": f"bench-{name}",
    }
    spec = {"stage": stage, "want": {**base, **want}, "output": str(output)}

    def prepare():  # a stage resumes from an existing output dir: always start clean
        shutil.rmtree(output, ignore_errors=True)
        (ctx.out / "mlflow").mkdir(parents=True, exist_ok=True)
        spec_path = ctx.out / "specs" / f"{name}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        resolved = {**spec, "want": {k: (v() if callable(v) else v) for k, v in spec["want"].items()}}
        spec_path.write_text(json.dumps(resolved, indent=2, default=str))

    spec_path = ctx.out / "specs" / f"{name}.json"
    cmd = [sys.executable, BENCH_DIR / "ours_worker.py", spec_path]
    return {"name": name, "role": "ours", "cmd": cmd, "cwd": REPO, "prepare": prepare, "output": output, **meta}


def refine_trl_rates(res: dict) -> dict:
    """The peer scripts round rates to 2 decimals (0.06 pairs/s under load = +-8 %). Where the count per step is
    constant (pairs, samples, forced-length generated tokens), recompute the steady rate from the totals and the
    steady seconds: count/step x steady steps / steady_s. The reported value stays under `<key>_reported`."""
    n, w, st = res.get("steps"), res.get("warmup_steps_excluded"), res.get("steady_s")
    if res.get("failed") or not n or w is None or not st:
        return res
    for base in ("pairs", "samples", "gen_tokens"):
        total, key = res.get(f"{base}_total"), f"{base}_per_s"
        if total is None or res.get(key) is None or f"{key}_reported" in res:
            continue
        res[f"{key}_reported"] = res[key]
        res[key] = round(total / n * (n - w) / st, 5)
    return res


def run_plan(ctx: Ctx, sides: list[dict], timeout: float | None = None) -> list[dict]:
    results = []
    for side in sides:
        if side.get("skip") and side["skip"]():
            print(f"[bench] {side['name']}: skipped (not needed)", file=sys.stderr, flush=True)
            continue
        if side.get("prepare"):
            side["prepare"]()
        res = run_side(side["name"], side["cmd"], ctx.log_dir, cwd=side.get("cwd"), timeout=timeout)
        res["role"], res["name"] = side["role"], side["name"]
        res.update(
            {
                k: v
                for k, v in side.items()
                if k not in ("cmd", "cwd", "prepare", "name", "role", "skip", "output") and not callable(v)
            }
        )
        res["output"] = str(side["output"]) if side.get("output") else None
        if side["role"] == "trl":
            refine_trl_rates(res)
        results.append(res)
    return results


def metric(res: dict | None, key: str, stage: str | None = None):
    """A throughput figure from a side's result: TRL's top-level key, or our metrics.json (plain or namespaced)."""
    if not res or res.get("failed"):
        return None
    if res.get("role") == "ours":
        m = res.get("metrics") or {}
        for k in (key, f"{stage}/{key}" if stage else None, f"train/{key}"):
            if k and m.get(k) is not None:
                return m[k]
        return None
    return res.get(key)


def rss(res: dict | None):
    return None if not res else res.get("peak_rss_mib_wait4")


def config_fields(stage: str) -> set[str]:
    """Field names of our stage's config class ({} when the stage cannot be imported yet)."""
    import importlib

    mod_name, _, cls_name = {
        "sft": ("rlhf_pipeline.training.sft", "", "SFTConfig"),
        "reward": ("rlhf_pipeline.training.reward", "", "RewardConfig"),
        "ppo": ("rlhf_pipeline.ppo.config", "", "PPOConfig"),
        "dpo": ("rlhf_pipeline.training.dpo", "", "DPOConfig"),
    }[stage]
    try:
        return set(getattr(importlib.import_module(mod_name), cls_name).model_fields)
    except Exception:  # noqa: BLE001 -- a stage still being written must not break the other benchmarks
        return set()


def bf16_knob(stage: str) -> dict | None:
    """Our CPU recipe setting, if the stage has the knobs: frozen base weights in bf16 + bf16 autocast (LoRA and
    heads stay fp32), plus the fused elementwise kernels (compiled in the first, untimed step)."""
    fields = config_fields(stage)
    if "mixed_precision" in fields and "precision" in fields:
        return {
            "precision": "bf16",
            "mixed_precision": "bf16",
            **({"cpu_kernels": "fused"} if "cpu_kernels" in fields and stage != "ppo" else {}),
        }
    return None


def compare_rows(
    stage: str, unit: str, ours: list[dict], trl: list[dict], key: str, goal: float, note: str = ""
) -> list[dict]:
    """Best of ours vs best of TRL (the goal row), then our best vs every TRL configuration, then ours fp32 vs
    TRL fp32 (same precision on both sides)."""
    bo, bt = best(ours, key), best(trl, key)
    o, t = (bo or {}).get(key), (bt or {}).get(key)
    out = [
        {
            "stage": stage,
            "metric": f"{unit}, best vs best ({bo['name'] if bo else '-'})",
            "ours": o,
            "trl": t,
            "trl_side": bt["name"] if bt else "-",
            "ratio": ratio(o, t),
            "goal": goal,
            "ours_rss": rss(bo),
            "trl_rss": rss(bt),
            **({"note": note} if note else {}),
        }
    ]
    for r in trl:
        out.append(
            {
                "stage": stage,
                "metric": f"{unit}, {bo['name'] if bo else '-'} vs {r['name']}",
                "ours": o,
                "trl": r.get(key),
                "trl_side": r["name"],
                "ratio": ratio(o, r.get(key)),
                "ours_rss": rss(bo),
                "trl_rss": rss(r),
            }
        )
    fp32_ours = [r for r in ours if "bf16" not in r["name"]]
    fp32_trl = [r for r in trl if "bf16" not in r["name"]]
    fo, ft = best(fp32_ours, key), best(fp32_trl, key)
    if fo and ft and fo is not bo:
        out.append(
            {
                "stage": stage,
                "metric": f"{unit}, fp32 only ({fo['name']} vs {ft['name']})",
                "ours": fo.get(key),
                "trl": ft.get(key),
                "trl_side": ft["name"],
                "ratio": ratio(fo.get(key), ft.get(key)),
                "ours_rss": rss(fo),
                "trl_rss": rss(ft),
            }
        )
    return out
