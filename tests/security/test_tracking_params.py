"""No credential reaches MLflow through a logged parameter or tag: a stage run's params (its whole config) and
lineage tags, and the pipeline parent run's params, read back from a real `mlflow server`."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from rlhf_pipeline import tracking
from rlhf_pipeline.tracking import TrackingOptions, stage_run

PASSWORD = "Fake-Pw-77"
URL = f"https://ci:{PASSWORD}@data.example.com/dump"


class SourceConfig(TrackingOptions):
    source: str  # any config field a user may fill with a URL that carries credentials
    mirrors: list[str] = []


def _logged_text(client, run_id: str) -> str:
    run = client.get_run(run_id)
    return " ".join([*run.data.params.values(), *run.data.tags.values()])


def test_credentials_in_a_config_or_a_model_url_are_redacted(mlflow_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = SourceConfig(tracking_uri=mlflow_server, experiment_name="sec", source=URL, mirrors=[URL])
    with stage_run(cfg, "sft", base_model=f"https://hf_user:{PASSWORD}@hub.example.com/model") as run:
        pass
    client = MlflowClient(tracking_uri=mlflow_server)
    params = client.get_run(run.run_id).data.params
    assert params["sft.source"] == "https://ci:***@data.example.com/dump"  # still says where the data came from
    assert PASSWORD in URL and PASSWORD not in _logged_text(client, run.run_id)
    assert run.lineage["base_model"] == "https://hf_user:***@hub.example.com/model"  # what a version is tagged with

    parent = tracking.start_pipeline_run(mlflow_server, "sec", "rlhf-pipeline sec", {"input": URL})
    assert client.get_run(parent.run_id).data.params["pipeline.input"] == "https://ci:***@data.example.com/dump"
    assert PASSWORD not in _logged_text(client, parent.run_id)


def test_the_printed_run_url_carries_no_userinfo():
    run = tracking.PipelineRun(uri=f"https://ci:{PASSWORD}@mlflow.example.com:8443/", experiment_id="3", run_id="ab")
    assert run.ui_url() == "https://mlflow.example.com:8443/#/experiments/3/runs/ab"
