"""Fixtures for the ops tests: helpers to register versions on the shared real `mlflow server` (tests/conftest.py)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    """A port nobody listens on (for stub servers and unreachable-server tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def client(mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture()
def model_name() -> str:
    """A fresh registered-model name per test: tests share one server."""
    return f"policy-{uuid.uuid4().hex[:8]}"


def register_version(
    client,
    model: str,
    *,
    tags: dict[str, float | str] | None = None,
    metrics: dict[str, float] | None = None,
    tmp_path: Path,
) -> str:
    """A real model version: a run with metrics and a small logged artifact, registered from it."""
    from mlflow.exceptions import MlflowException

    exp_name = "promote-tests"
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
    run = client.create_run(exp_id)
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    artifact = tmp_path / f"adapter-{uuid.uuid4().hex[:6]}" / "adapter_config.json"
    artifact.parent.mkdir(parents=True)
    artifact.write_text('{"r": 8}')
    client.log_artifacts(run.info.run_id, str(artifact.parent), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(model)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(
        model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, await_creation_for=0
    )  # file artifacts: READY at once
    for key, value in (tags or {}).items():
        client.set_model_version_tag(model, mv.version, key, str(value))
    return str(mv.version)


def snapshot(client, model: str) -> dict:
    """Everything a promotion may change: aliases, every version's tags, the lock model's existence."""
    rm = client.get_registered_model(model)
    versions = client.search_model_versions(f"name='{model}'")
    locks = [m.name for m in client.search_registered_models(f"name='{model}.promotion-lock'")]
    return {
        "aliases": dict(sorted((rm.aliases or {}).items())),
        "tags": {v.version: dict(sorted(v.tags.items())) for v in versions},
        "locks": locks,
    }
