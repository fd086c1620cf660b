"""Run ONE of our stages in this process (for the benchmark driver) and print one JSON line.

    python bench/ours_worker.py SPEC.json

SPEC = {"stage": "sft"|"reward"|"ppo"|"dpo", "want": {knob: value}, "output": DIR}
`want` keys are config field names; "a|b" lists alternative names (the first one the stage's config class has
wins). Knobs the config lacks are NOT silently dropped: they are reported under `missing_knobs` (so the table can
say what could not be matched) and the run continues with the stage default.

The JSON line holds the stage's own `<output>/metrics.json` (its steady-state throughput figures), the config
actually used, wall/setup times, the load average before/after and this process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

_REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr  # stage progress / library chatter -> stderr; only the result goes to stdout

ENTRY = {
    "sft": ("rlhf_pipeline.training.sft", "run_sft", "SFTConfig"),
    "reward": ("rlhf_pipeline.training.reward", "run_reward", "RewardConfig"),
    "ppo": ("rlhf_pipeline.ppo.trainer", "run_ppo", "PPOConfig"),
    "dpo": ("rlhf_pipeline.training.dpo", "run_dpo", "DPOConfig"),
}


def resolve_fields(cfg_cls, want: dict) -> tuple[dict, dict]:
    fields = cfg_cls.model_fields
    used, missing = {}, {}
    for key, value in want.items():
        names = key.split("|")
        hit = next((n for n in names if n in fields), None)
        if hit is None:
            missing[key] = value
        else:
            used[hit] = value
    return used, missing


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    t_start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    import importlib

    import torch

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    mod_name, fn_name, cfg_name = ENTRY[spec["stage"]]
    mod = importlib.import_module(mod_name)
    cfg_cls = getattr(mod, cfg_name)
    fn = getattr(mod, fn_name)
    want = dict(spec["want"])
    want.setdefault("num_threads", threads)
    used, missing = resolve_fields(cfg_cls, want)
    cfg = cfg_cls(**used)
    t_setup = time.perf_counter() - t_start
    t0 = time.perf_counter()
    summary = fn(cfg)
    t_run = time.perf_counter() - t0
    from rlhf_pipeline.results import METRICS_FILE, StageResult

    out_dir = spec["output"]
    # the StageResult as flat JSON: envelope (status, processes, registered, ...) + the stage's metrics at top level
    metrics = (
        StageResult.read(out_dir).model_dump(mode="json") if os.path.isfile(os.path.join(out_dir, METRICS_FILE)) else {}
    )
    if hasattr(summary, "model_dump"):
        summary = summary.model_dump(mode="json")
    res = {
        "bench": f"ours_{spec['stage']}",
        "stage": spec["stage"],
        "metrics": metrics,
        "summary": summary if isinstance(summary, dict) else None,
        "config_used": json.loads(cfg.model_dump_json()),
        "missing_knobs": missing,
        "run_wall_s": round(t_run, 2),
        "import_setup_s": round(t_setup, 2),
        "load_before_worker": load_before,
        "load_after_worker": [round(x, 2) for x in os.getloadavg()],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    _REAL_STDOUT.write(json.dumps(res, default=str) + "\n")
    _REAL_STDOUT.flush()


if __name__ == "__main__":
    main()
