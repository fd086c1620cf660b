"""System metrics on every stage run (MLflow's sampler, psutil), unless the environment turns them off."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from rlhf_pipeline.tracking import TrackingOptions, stage_run, system_metrics_enabled


def _metrics_after_a_second(monkeypatch) -> set[str]:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with stage_run(TrackingOptions(experiment_name="sys"), "sft") as run:
        time.sleep(1.5)
    return set(MlflowClient().get_run(run.run_id).data.metrics)


def test_stage_runs_log_system_metrics(mlflow_sqlite, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= _metrics_after_a_second(
        monkeypatch
    )


def test_the_environment_can_turn_them_off(mlflow_sqlite, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert not system_metrics_enabled()
    assert not {k for k in _metrics_after_a_second(monkeypatch) if k.startswith("system/")}
