"""MLflow tracking shared by every stage.

- Where: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else a local SQLite file (`./mlflow.db`, artifacts in
  `./mlartifacts`). `$MLFLOW_EXPERIMENT_ID` and `$MLFLOW_RUN_ID` are honoured when set (Kubeflow Pipelines 2.17
  injects them into task pods). MLflow itself removes `MLFLOW_RUN_ID` from the environment (start_run() without
  a run id, end_run()), so a process started later -- a worker rank, a child process, the next stage in the pod --
  would no longer see it: `stage_run` keeps a copy in `$RLHF_MLFLOW_RUN_ID` while the run is active (the active
  run's id, injected or not) and restores the environment it found when the run ends.
- Fail fast: a configured but unreachable tracking server stops the stage within seconds, before training.
- What: the full stage config as params (prefixed `<stage>.`, so several stages can share one run), metrics per
  step under the stage's namespace, and the stage output registered as a model version `<prefix>-<stage>` tagged
  with its lineage (data hash, base model, git commit, config hash, Kubeflow run id).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.http_probe import is_http_url, probe
from rlhf_pipeline.secrets import redact
from rlhf_pipeline.stages import registered_name

DEFAULT_EXPERIMENT = "rlhf-pipeline"
RUN_ID_ENV = "MLFLOW_RUN_ID"  # what Kubeflow's MLflow plugin injects (and MLflow removes again)
RUN_ID_COPY_ENV = "RLHF_MLFLOW_RUN_ID"  # our copy, which MLflow leaves alone
REACHABILITY_TIMEOUT_S = 5.0


class TrackingOptions(StageConfig):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db."
    )
    experiment_name: str = Field(
        DEFAULT_EXPERIMENT, description="MLflow experiment (ignored if $MLFLOW_EXPERIMENT_ID)."
    )
    run_name: str | None = Field(None, description="MLflow run name; default '<stage>'.")
    registered_model_prefix: str = Field("rlhf", description="Registered model names are '<prefix>-<stage>'.")
    register_model: bool = Field(True, description="Register the stage output as an MLflow model version.")
    kfp_run_id: str | None = Field(
        None, description="Kubeflow run id, recorded as a lineage tag (set by the pipeline)."
    )


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Raise UserError within `timeout` seconds if an http(s) tracking server does not answer its health check."""
    if not is_http_url(uri):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return
    answer = probe(uri.rstrip("/") + "/health", timeout)
    if not answer.reachable:
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({answer.reason}); "
            "start it or set MLFLOW_TRACKING_URI / --tracking-uri"
        )
    if not answer.healthy:
        raise UserError(f"MLflow tracking server {uri} answered HTTP {answer.status} on /health")


def git_commit() -> str:
    """The code version: $RLHF_GIT_COMMIT (baked into images) or the checkout's HEAD, else 'unknown'."""
    if os.environ.get("RLHF_GIT_COMMIT"):
        return os.environ["RLHF_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(data_dir: str | Path) -> str:
    """The prepare-data input hash (stats.json) when present, so every stage tags the same data lineage."""
    stats = Path(data_dir) / "stats.json"
    if stats.is_file():
        try:
            data = json.loads(stats.read_text())
            # prepare-data writes `input_sha256`; `input_hash` is the older name
            return str(data.get("input_sha256") or data.get("input_hash") or "unknown")
        except (json.JSONDecodeError, OSError):
            return "unknown"
    return "unknown"


@dataclass
class StageRun:
    """An active MLflow run for one stage: log metrics, register the output."""

    stage: str
    run_id: str
    prefix: str
    register_enabled: bool
    lineage: dict[str, str] = field(default_factory=dict)
    registered: list[dict[str, Any]] = field(default_factory=list)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(data, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        import mlflow

        mlflow.log_table(data, artifact_file)

    def register(
        self,
        local_dir: str | Path,
        *,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_path: str = "model",
    ) -> dict[str, Any] | None:
        """Upload `local_dir` as run artifacts and register it as a new version of the stage's registered model
        (`stages.registered_name`: `<prefix>-sft`, `<prefix>-reward`, `<prefix>-policy`) unless `name` is given."""
        if not self.register_enabled:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        name = name or registered_name(self.prefix, self.stage)
        mlflow.log_artifacts(str(local_dir), artifact_path)
        client = MlflowClient()
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        all_tags = {**self.lineage, **(tags or {})}
        source = f"{mlflow.get_artifact_uri(artifact_path)}"
        version = client.create_model_version(name, source=source, run_id=self.run_id, tags=all_tags)
        entry = {
            "name": name,
            "version": int(version.version),
            "uri": f"models:/{name}/{version.version}",
            "run_id": self.run_id,
        }
        self.registered.append(entry)
        return entry


def injected_run_id() -> str | None:
    """The MLflow run this process belongs to, if someone else created it: `$MLFLOW_RUN_ID` (Kubeflow), else the
    copy `$RLHF_MLFLOW_RUN_ID` (kept by a parent's `stage_run`, or passed to a TrainJob's pods)."""
    return os.environ.get(RUN_ID_ENV) or os.environ.get(RUN_ID_COPY_ENV) or None


@contextmanager
def _run_id_in_environment(run_id: str, injected: bool) -> Iterator[None]:
    """While the run is active: its id in `$RLHF_MLFLOW_RUN_ID` (child processes attach to it); afterwards: the
    environment as it was, with an injected `$MLFLOW_RUN_ID` put back after end_run() removed it."""
    saved = {name: os.environ.get(name) for name in (RUN_ID_ENV, RUN_ID_COPY_ENV)}
    os.environ[RUN_ID_COPY_ENV] = run_id
    if injected:
        os.environ[RUN_ID_ENV] = run_id
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _flat_params(stage: str, params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[f"{stage}.{key}"] = redact(text)[:6000]  # never a password (tracking URI) in a param; MLflow's limit
    return out


@contextmanager
def stage_run(
    cfg: TrackingOptions, stage: str, *, data_dir: str | Path | None = None, base_model: str | None = None
) -> Iterator[StageRun]:
    """Start (or attach to) the MLflow run for `stage`; fails fast if the tracking server is unreachable."""
    import mlflow

    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)

    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not experiment_id:
        experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):  # keep local artifacts next to the database, not in the cwd
                db_path = Path(uri.removeprefix("sqlite:///")).resolve()  # relative to the cwd, as SQLAlchemy reads it
                artifact_location = (db_path.parent / "mlartifacts").as_uri()
            try:
                experiment_id = mlflow.create_experiment(cfg.experiment_name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:  # created concurrently by another stage
                experiment_id = mlflow.get_experiment_by_name(cfg.experiment_name).experiment_id
        else:
            experiment_id = experiment.experiment_id

    lineage = {
        "data_hash": data_hash(data_dir) if data_dir else "unknown",
        "base_model": base_model or "unknown",
        "git_commit": git_commit(),
        "config_hash": cfg.config_hash(),
        "stage": stage,
    }
    kfp_run_id = cfg.kfp_run_id or os.environ.get("KFP_RUN_ID")
    if kfp_run_id:
        lineage["kfp_run_id"] = kfp_run_id

    run_id = injected_run_id()
    if run_id:  # Kubeflow created the run for this task: attach to it
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name or stage)
    with _run_id_in_environment(active.info.run_id, injected=bool(run_id)), active as run:
        mlflow.set_tags({f"rlhf.{k}": v for k, v in lineage.items()})
        mlflow.log_params(_flat_params(stage, cfg.to_flat_dict()))
        yield StageRun(
            stage=stage,
            run_id=run.info.run_id,
            prefix=cfg.registered_model_prefix,
            register_enabled=cfg.register_model,
            lineage=lineage,
        )


def client(tracking_uri: str | None = None):
    """The one MlflowClient builder for tools outside a stage run (the report step, `rlhf run`'s summary,
    `rlhf promote`): the stages' URI resolution ($MLFLOW_TRACKING_URI, else ./mlflow.db), checked reachable
    first, so an unreachable server fails in seconds with one line."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
