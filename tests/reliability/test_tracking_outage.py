"""A tracking outage in the middle of a stage run (issue 18, item 3), against a real `mlflow server` that the test
kills and restarts: logging returns within seconds (MLflow's HTTP retries bounded), metrics are buffered and sent
when the server is back (every step once), and an outage longer than $RLHF_TRACKING_OUTAGE_S stops the stage with
one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from faults import row

from rlhf_pipeline import tracking
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.tracking import TrackingOptions, stage_run


class Server:
    """`mlflow server` on a fixed port and SQLite file, so it can be killed and started again as the same store."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root}/mlflow.db", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture()
def server(tmp_path, unused_port, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    for var in tracking.BOUNDED_HTTP:
        monkeypatch.delenv(var, raising=False)
    s = Server(tmp_path, unused_port)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.kill()


@row(
    "sft/reward/dpo/ppo",
    "MLflow server killed mid-run, restarted",
    "0",
    r"MLflow tracking unavailable \(.*\): buffering",
    "every metric step in the run once (buffered, sent when back); each log call bounded to seconds",
)
def test_metrics_survive_a_short_outage(server, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 0.0)  # retry at every log (the default waits 10 s between tries)
    cfg = TrackingOptions(tracking_uri=server.uri, experiment_name="outage")
    with stage_run(cfg, "sft") as run:
        run.log_metrics({"sft/loss": 1.0}, step=1)
        server.kill()
        began = time.monotonic()
        run.log_metrics({"sft/loss": 2.0}, step=2)
        run.log_metrics({"sft/loss": 3.0}, step=3)
        assert time.monotonic() - began < 20  # bounded retries: seconds, not MLflow's default minutes
        assert "MLflow tracking unavailable" in capsys.readouterr().err
        assert len(run.pending) == 2
        server.start()
        run.log_metrics({"sft/loss": 4.0}, step=4)
        assert run.pending == [] and "buffered metrics sent" in capsys.readouterr().err
        run_id = run.run_id
    history = MlflowClient(tracking_uri=server.uri).get_metric_history(run_id, "sft/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


@row(
    "sft/reward/dpo/ppo",
    "MLflow server down longer than $RLHF_TRACKING_OUTAGE_S",
    "2",
    r"MLflow tracking unavailable for more than 1 s",
    "the checkpoints kept: a rerun resumes",
)
def test_a_long_outage_stops_the_stage_with_one_line(server, monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 0.0)
    monkeypatch.setenv(tracking.OUTAGE_ENV, "1")
    cfg = TrackingOptions(tracking_uri=server.uri, experiment_name="outage")
    began = time.monotonic()
    with pytest.raises(UserError, match=r"MLflow tracking unavailable for more than 1 s .*rerun to resume"):
        with stage_run(cfg, "sft") as run:
            run.log_metrics({"sft/loss": 1.0}, step=1)
            server.kill()
            for step in range(2, 100):
                run.log_metrics({"sft/loss": float(step)}, step=step)
                time.sleep(0.2)
    assert time.monotonic() - began < 60


def _sampler_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_the_system_metrics_sampler_neither_hangs_nor_crashes_a_stage_in_an_outage(server, monkeypatch, capsys):
    """Stage runs sample system metrics (MLflow's sampler thread): with the server killed mid-run the sampler's
    failures stay in its own thread (warnings, no exception in the stage), the stage's own metrics are buffered and
    sent when the server is back, the run ends normally and in bounded time, and no sampler outlives it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 0.0)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = TrackingOptions(tracking_uri=server.uri, experiment_name="outage")
    others = set(_sampler_threads())  # samplers of earlier tests' runs in this process are not this run's
    ours = lambda: [t for t in _sampler_threads() if t not in others]  # noqa: E731
    with stage_run(cfg, "sft") as run:
        run.log_metrics({"sft/loss": 1.0}, step=1)
        time.sleep(1.0)  # a few samples (MLflow batches them: they reach the server at the latest when the run ends)
        assert ours()
        server.kill()
        run.log_metrics({"sft/loss": 2.0}, step=2)
        time.sleep(3.0)  # the sampler meets the dead server: its errors must not reach the stage
        server.start()
        run.log_metrics({"sft/loss": 3.0}, step=3)
        assert run.pending == []
        ending = time.monotonic()
    assert time.monotonic() - ending < 60  # ending the run (the sampler stopped, its last batch sent) does not hang
    deadline = time.monotonic() + 30
    while ours():
        assert time.monotonic() < deadline, "a system-metrics sampler outlived its run by 30 s"
        time.sleep(0.2)
    history = MlflowClient(tracking_uri=server.uri).get_metric_history(run.run_id, "sft/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    finished = MlflowClient(tracking_uri=server.uri).get_run(run.run_id)
    assert finished.info.status == "FINISHED" and "system/cpu_utilization_percentage" in finished.data.metrics
