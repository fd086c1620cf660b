"""Kill -9 and SIGTERM of SFT, reward, DPO and PPO at random moments (and deterministically in the middle of a
checkpoint save), 5 times each, then a rerun: it must end at the same step with weights bit-identical to an
uninterrupted run (LoRA dropout on), in ONE MLflow run with every metric step logged once and ONE registered
version."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from faults import row
from safetensors.torch import load_file
from stage_runs import STEPS, data_for, run_to_end, stage_config, start

from rlhf_pipeline.stages import registered_name
from rlhf_pipeline.training.checkpoint import latest_checkpoint
from rlhf_pipeline.training.loop import PREEMPTED_EXIT_CODE

KILLS = 5
STAGES = ["sft", "reward", "dpo", "ppo"]
SIGNALS = [signal.SIGKILL, signal.SIGTERM]
KILL_CASES = [(stage, sig.name) for sig in SIGNALS for stage in STAGES]  # the table's rows (fault_table.py)
LOSS_KEY = {"sft": "sft/loss", "reward": "rm/loss", "dpo": "dpo/loss", "ppo": "ppo/reward_mean"}


def adapter_tensors(output: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((output / "adapter").glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors, f"no adapter weights in {output}"
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def mlflow_state(uri: str, stage: str) -> tuple[list, dict[str, list[int]], list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    steps = {
        key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
        for run in runs
        for key in run.data.metrics
    }
    versions = client.search_model_versions(f"name='{registered_name('rlhf', stage)}'")
    return runs, steps, versions


def reference_run(stage: str, cfg, log: Path) -> float:
    """Run `cfg` uninterrupted; return the seconds per step (from when its checkpoints appeared), which scales
    the random kill delays to this machine."""
    proc = start(stage, cfg, log)
    seen: dict[int, float] = {}
    root = Path(cfg.output) / "checkpoints"
    while proc.exitcode is None:
        for path in root.glob("step-*") if root.is_dir() else []:
            seen.setdefault(int(path.name.split("-")[1]), time.monotonic())
        time.sleep(0.01)
    assert proc.exitcode == 0, log.read_text()[-3000:]
    first, last = min(seen), max(seen)
    return (seen[last] - seen[first]) / (last - first)


def wait_for_checkpoint(output: str, step: int, proc, timeout: float = 300) -> None:
    """Until `output` has a checkpoint of at least `step` (any, even one being written) or the process ended."""
    deadline = time.monotonic() + timeout
    root = Path(output) / "checkpoints"
    while proc.exitcode is None and time.monotonic() < deadline:
        done = [int(p.name.split("-")[1]) for p in root.glob("step-*")] if root.is_dir() else []
        if max(done, default=0) >= step:
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
    """stage -> (data dir, the uninterrupted run's output, seconds per step): one reference per stage, shared by
    the kill -9 and the SIGTERM case."""
    cache: dict[str, tuple[Path, Path, float]] = {}

    def get(stage: str) -> tuple[Path, Path, float]:
        if stage not in cache:
            tmp = tmp_path_factory.mktemp(f"reference-{stage}")
            data = data_for(tmp)
            before = os.environ.get("MLFLOW_TRACKING_URI")
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'reference.db'}"
            try:
                reference = stage_config(stage, tiny_model_dir, data, tmp / "reference")
                assert reference.lora_dropout > 0  # the dropout masks must be replayed exactly
                cache[stage] = (data, tmp / "reference", reference_run(stage, reference, tmp / "reference.log"))
            finally:
                if before is None:
                    os.environ.pop("MLFLOW_TRACKING_URI")
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = before
        return cache[stage]

    return get


@row(
    "{stage}",
    "{signal} x5 at random moments (one in the middle of a checkpoint save), then a rerun",
    "-9 / 143 (SIGTERM in a step: checkpoint, then exit), rerun 0",
    "",
    "same final step, weights bit-identical to an uninterrupted run (LoRA dropout on); one MLflow run FINISHED, "
    "each metric step once, one registered version",
)
@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sig", SIGNALS, ids=["kill-9", "sigterm"])
def test_killed_at_random_moments_resumes_bit_identical(stage, sig, references, tiny_model_dir, tmp_path, monkeypatch):
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    data, reference_out, step_seconds = references(stage)

    uri = f"sqlite:///{tmp_path / 'killed.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = stage_config(stage, tiny_model_dir, data, tmp_path / "killed")
    log = tmp_path / "killed.log"
    rng = random.Random(f"{stage}-{int(sig)}")
    statuses, steps_before_rerun = [], []
    for attempt in range(KILLS):
        # attempt 0 is stopped in the middle of writing step 2's checkpoint; attempt k > 0 once the run has got
        # past step 2(k-1) (so every attempt makes progress), plus a random delay: in a step, a save, or startup
        proc = start(stage, cfg, log, kill_in_save=(2, int(sig)) if attempt == 0 else None)
        if attempt > 0:
            wait_for_checkpoint(cfg.output, 2 * (attempt - 1), proc)
            time.sleep(rng.uniform(0.0, 3.0) * step_seconds)
            if proc.exitcode is None:
                os.kill(proc.pid, sig)
        proc.join(300)
        statuses.append(proc.exitcode)
        newest = latest_checkpoint(cfg.output, report=False)
        steps_before_rerun.append(int(newest.name.split("-")[1]) if newest else 0)
    print(f"{stage} {sig.name}: exit statuses {statuses}, newest checkpoint after each {steps_before_rerun}")
    assert sum(status != 0 for status in statuses) >= 3  # most attempts really were interrupted
    # SIGKILL: killed (-9) or already done (0); SIGTERM: checkpointed and stopped (143), killed before the loop
    # installed its handler (-15), or already done (0)
    allowed = {0, -9} if sig == signal.SIGKILL else {0, -15, PREEMPTED_EXIT_CODE}
    assert set(statuses) <= allowed, (statuses, log.read_text()[-3000:])
    assert statuses[0] in ((-9,) if sig == signal.SIGKILL else (PREEMPTED_EXIT_CODE,))
    assert "Traceback" not in log.read_text()

    assert run_to_end(stage, cfg, log) == 0, log.read_text()[-3000:]
    result = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    expected = json.loads((reference_out / "metrics.json").read_text())
    assert result["steps"] == expected["steps"] == STEPS
    assert_bit_identical(adapter_tensors(reference_out), adapter_tensors(tmp_path / "killed"))

    runs, steps, versions = mlflow_state(uri, stage)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(steps[LOSS_KEY[stage]]) == list(range(1, STEPS + 1))  # every step once, none lost
    duplicated = {k: v for k, v in steps.items() if len(v) != len(set(v))}
    assert not duplicated
    assert len(versions) == 1 and versions[0].run_id == runs[0].info.run_id
    assert result["registered"][0]["version"] == "1"
