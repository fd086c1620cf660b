"""MLflow tracking: local SQLite store, a real `mlflow server`, lineage tags, the unreachable-server error."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.tracking import TrackingOptions, stage_run


def _register_demo(tmp_path, uri: str | None, monkeypatch, kfp_run_id=None):
    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text('{"input_hash": "abc123"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("not really weights")
    cfg = TrackingOptions(tracking_uri=uri, experiment_name="t", registered_model_prefix="demo", kfp_run_id=kfp_run_id)
    with stage_run(cfg, "sft", data_dir=data, base_model="tiny") as run:
        run.log_metrics({"sft/loss": 1.5}, step=1)
        run.log_metrics({"sft/loss": 1.0}, step=2)
        entry = run.register(out)
    return entry, run


def _check_registry(uri, entry, run, expect_kfp=None):
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("demo-sft", str(entry["version"]))
    assert version.run_id == run.run_id
    tags = version.tags
    assert tags["data_hash"] == "abc123" and tags["base_model"] == "tiny" and tags["stage"] == "sft"
    assert len(tags["config_hash"]) == 16 and tags["git_commit"]
    if expect_kfp:
        assert tags["kfp_run_id"] == expect_kfp
    history = [m.value for m in client.get_metric_history(run.run_id, "sft/loss")]
    assert history == [1.5, 1.0]
    assert client.get_run(run.run_id).data.params["sft.experiment_name"] == "t"
    files = {a.path for a in client.list_artifacts(run.run_id, "model")}
    assert files == {"model/weights.txt"}


def test_sqlite_registry_with_lineage(tmp_path, mlflow_sqlite, monkeypatch):
    entry, run = _register_demo(tmp_path, None, monkeypatch, kfp_run_id="kfp-42")
    assert entry["uri"] == "models:/demo-sft/1"
    _check_registry(mlflow_sqlite, entry, run, expect_kfp="kfp-42")
    (tmp_path / "again").mkdir()
    entry2, _ = _register_demo(tmp_path / "again", None, monkeypatch)
    assert entry2["version"] == 2


def test_real_mlflow_server_registry(tmp_path, mlflow_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    entry, run = _register_demo(tmp_path, mlflow_server, monkeypatch)
    _check_registry(mlflow_server, entry, run)


def test_attaches_to_injected_run_id(tmp_path, mlflow_sqlite, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    exp = mlflow.create_experiment("kfp")
    run = MlflowClient().create_run(exp)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    with stage_run(TrackingOptions(), "rm") as stage:
        stage.log_metrics({"rm/accuracy": 0.75})
    assert stage.run_id == run.info.run_id
    assert MlflowClient().get_run(run.info.run_id).data.metrics["rm/accuracy"] == 0.75


def test_unreachable_server_fails_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = TrackingOptions(tracking_uri=f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(UserError, match="unreachable"):
        with stage_run(cfg, "sft"):
            pytest.fail("the stage body must not run")
    assert time.time() - t0 < 10


def test_relative_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "w.txt").write_text("x")
    cfg = TrackingOptions(tracking_uri="sqlite:///runs/mlflow.db", experiment_name="rel")
    with stage_run(cfg, "sft") as run:
        run.register(tmp_path / "out")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert list((tmp_path / "runs" / "mlartifacts").rglob("w.txt"))
