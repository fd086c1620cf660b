"""MLflow tracking: local SQLite store, a real `mlflow server`, lineage tags, the unreachable-server error."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.entities import LoggedModelStatus
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
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # MLflow 3: a logged model of the run
    assert logged.source_run_id == run.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "demo-sft", "version": version.version}]
    assert logged.status == LoggedModelStatus.READY and logged.tags["stage"] == "sft"
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert files == {"weights.txt"}


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


def test_an_injected_task_run_is_the_stage_run(tmp_path, mlflow_sqlite, monkeypatch):
    """Kubeflow 2.17's plugin injects the task's own run (nested under its pipeline run): the stage logs into it."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    exp = mlflow.create_experiment("kfp")
    pipeline = MlflowClient().create_run(exp)
    task = MlflowClient().create_run(exp, tags={"mlflow.parentRunId": pipeline.info.run_id})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    monkeypatch.setenv("MLFLOW_RUN_ID", task.info.run_id)
    with stage_run(TrackingOptions(), "rm") as stage:
        stage.log_metrics({"rm/accuracy": 0.75})
    assert stage.run_id == task.info.run_id
    assert MlflowClient().get_run(task.info.run_id).data.metrics["rm/accuracy"] == 0.75
    assert len(MlflowClient().search_runs([exp])) == 2  # no third run


def test_an_injected_pipeline_run_gets_one_child_per_stage(tmp_path, mlflow_sqlite, monkeypatch):
    """An injected top-level run is the pipeline's: each stage opens a nested run under it (not several stages in
    one run), a retry re-attaches to its first attempt's child, and `$MLFLOW_RUN_ID` is as it was afterwards."""
    import os

    import mlflow

    mlflow.set_tracking_uri(mlflow_sqlite)
    exp = mlflow.create_experiment("kfp")
    pipeline = MlflowClient().create_run(exp).info.run_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    monkeypatch.setenv("MLFLOW_RUN_ID", pipeline)
    with stage_run(TrackingOptions(), "sft") as sft:
        sft.log_metrics({"sft/loss": 2.0}, step=1)
    with stage_run(TrackingOptions(), "reward") as reward:
        pass
    with stage_run(TrackingOptions(), "sft", resume_run_id=sft.run_id) as retry:
        retry.log_metrics({"sft/loss": 2.5}, step=1)  # a step the run holds: not logged again
        retry.log_metrics({"sft/loss": 1.0}, step=2)
    assert os.environ["MLFLOW_RUN_ID"] == pipeline
    assert retry.run_id == sft.run_id != reward.run_id
    client = MlflowClient()
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{pipeline}'")
    assert sorted(r.info.run_name for r in children) == ["reward", "sft"]
    assert [m.value for m in client.get_metric_history(sft.run_id, "sft/loss")] == [2.0, 1.0]


def test_pipeline_parent_run_with_nested_stage_runs(tmp_path, mlflow_server, monkeypatch):
    """`rlhf run`'s structure through a real server: one parent per pipeline run, every stage nested under it in
    the parent's experiment, the experiment described and opening on its runs; a second pipeline run is a second
    parent, not more runs of the same names beside the first ones."""
    from rlhf_pipeline import tracking

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = TrackingOptions(tracking_uri=mlflow_server, experiment_name="ignored-under-a-parent")
    parents, stages = [], {}
    for attempt in ("one", "two"):
        parent = tracking.start_pipeline_run(mlflow_server, "pipes", "rlhf-pipeline starting", {"alignment": "ppo"})
        monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.run_id)
        for stage in ("sft", "reward"):
            with stage_run(cfg, stage) as run:
                run.log_metrics({f"{stage}/x": 1.0})
            stages.setdefault(attempt, []).append(run.run_id)
        report = tmp_path / "report.md"
        report.write_text(f"# report {attempt}\n")
        tracking.finish_pipeline_run(
            parent, succeeded=True, run_name=tracking.pipeline_run_name(f"rlhf-pipeline-{attempt}"), artifacts=[report]
        )
        parents.append(parent)

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("pipes")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "one nested run per stage" in experiment.tags["mlflow.note.content"]
    assert "`report/report.md`" in experiment.tags["mlflow.note.content"]  # where the report is
    assert client.get_experiment_by_name("ignored-under-a-parent") is None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 6  # 2 parents + 2 x 2 stages
    for parent, attempt in zip(parents, ("one", "two")):
        top = client.get_run(parent.run_id)
        assert top.info.run_name == f"rlhf-pipeline {attempt}" and top.info.status == "FINISHED"
        assert top.data.params == {"pipeline.alignment": "ppo"}
        assert [a.path for a in client.list_artifacts(parent.run_id, "report")] == ["report/report.md"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
        assert sorted(r.info.run_id for r in children) == sorted(stages[attempt])
        assert sorted(r.info.run_name for r in children) == ["reward", "sft"]
        assert parent.ui_url() == f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{parent.run_id}"


def test_a_missing_parent_run_is_one_line(tmp_path, mlflow_sqlite, monkeypatch):
    from rlhf_pipeline import tracking

    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "0123456789abcdef0123456789abcdef")
    with pytest.raises(UserError, match="RLHF_MLFLOW_PARENT_RUN_ID=0123456789abcdef0123456789abcdef: no such run"):
        with stage_run(TrackingOptions(), "sft"):
            pytest.fail("the stage body must not run")


def test_the_judge_run_is_named_judge():
    from rlhf_pipeline.tracking import default_run_name

    class Judge(TrackingOptions):
        subset: str = "judge"

    assert default_run_name(Judge(), "reward") == "judge"
    assert default_run_name(Judge(run_name="mine"), "reward") == "mine"
    assert default_run_name(TrackingOptions(), "reward") == "reward"


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
