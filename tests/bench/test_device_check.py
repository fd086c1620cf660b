"""bench/gpu/device_check.py runs end to end in its --tiny CPU mode: one JSON line per check on stdout, every
stage trained, saved, merged and resumed, the reward adapter shared by lineage. (Its GPU figures come only from
a run on a GPU; here the k-bit checks report that they need CUDA.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu" / "device_check.py"


@pytest.mark.slow
def test_device_check_tiny_runs_every_check(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # every stdout line is one JSON object
    checks = [line["check"] for line in lines]
    assert checks[0] == "device" and checks[-1] == "done"
    assert {"dtype_audit", "decode", "ppo_peak", "stage", "load_8bit"} <= set(checks)
    by_check = {c: [line for line in lines if line["check"] == c] for c in checks}
    assert by_check["dtype_audit"][0]["skipped"].startswith("needs CUDA")
    assert by_check["load_8bit"][0]["skipped"].startswith("needs CUDA")
    assert set(by_check["decode"][0]["tokens_per_s"]) == {"cache_loop", "generate", "generate_static_cache"}
    assert all(v > 0 for v in by_check["decode"][0]["tokens_per_s"].values())
    peak = by_check["ppo_peak"][0]
    assert peak["measured_gib"] is None and set(peak["estimated_gib"]) == {"generate", "forward", "update"}
    trained = [line for line in by_check["stage"] if "skipped" not in line]
    assert [line["stage"] for line in trained] == ["sft", "reward", "ppo", "dpo"]
    for line in trained:
        assert line["status"] == "trained" and line["resumed_from"] == "step-1" and line["merged"] and line["adapter"]
    assert next(line for line in trained if line["stage"] == "ppo")["reward_shared_base"] is True
