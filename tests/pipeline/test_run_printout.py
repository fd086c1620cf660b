"""`rlhf run`'s last lines: the parent run's page in the MLflow UI, and for a local store a UI command that runs
as printed (this interpreter's `-m mlflow`, not a `mlflow` script that is only on PATH in an activated venv)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from rlhf_pipeline import tracking
from rlhf_pipeline.orchestration.run_summary import mlflow_ui_lines


def test_a_local_store_gets_a_runnable_ui_command_and_the_run_url(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = tracking.PipelineRun(uri=uri, experiment_id="1", run_id="abc").ui_url()
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    lines = dict(mlflow_ui_lines({"tracking_uri": uri, "mlflow_run_url": url}))
    assert lines["MLflow run:"] == url
    command = shlex.split(lines["MLflow UI:"])
    assert command[0] == sys.executable and os.access(command[0], os.X_OK)
    assert command[1:4] == ["-m", "mlflow", "ui"] and command[command.index("--backend-store-uri") + 1] == uri
    # the printed command itself is understood (its --help; serving would block)
    shown = subprocess.run([*command[:4], "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--backend-store-uri" in shown.stdout


def test_a_tracking_server_needs_no_ui_command():
    url = tracking.PipelineRun(uri="http://127.0.0.1:5001", experiment_id="2", run_id="r").ui_url()
    assert url == "http://127.0.0.1:5001/#/experiments/2/runs/r"
    assert mlflow_ui_lines({"tracking_uri": "http://127.0.0.1:5001", "mlflow_run_url": url}) == [("MLflow run:", url)]
