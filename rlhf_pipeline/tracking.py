"""MLflow tracking shared by every stage.

- Where: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else a local SQLite file (`./mlflow.db`, artifacts in
  `./mlartifacts`). `$MLFLOW_EXPERIMENT_ID` and `$MLFLOW_RUN_ID` are honoured when set (Kubeflow Pipelines 2.17
  injects them into task pods). MLflow itself removes `MLFLOW_RUN_ID` from the environment (start_run() without
  a run id, end_run()), so a process started later -- a worker rank, a child process, the next stage in the pod --
  would no longer see it: `stage_run` keeps a copy in `$RLHF_MLFLOW_RUN_ID` while the run is active (the active
  run's id, injected or not) and restores the environment it found when the run ends.
- Fail fast: a configured but unreachable tracking server stops the stage within seconds, before training.
- Off the critical path: MLflow's own HTTP limits are bounded (`BOUNDED_HTTP`, unless the environment sets them),
  and metrics are buffered: a failed log keeps them, a warning line says so, and the next log after
  `RETRY_EVERY_S` sends them all. An outage longer than $RLHF_TRACKING_OUTAGE_S (default 300 s) fails the stage
  with one line; the checkpoints are kept, so the rerun resumes.
- One run per logical stage run: a retry re-attaches to the run the first attempt recorded (training/claim.py),
  skips the metric steps that run already holds (a resumed step is logged once), and registers no second version
  for the same run.
- Ownership: `check_version_owner` refuses a registered version whose run is not the one that produced the model.
- What: the full stage config as params (prefixed `<stage>.`, so several stages can share one run), metrics per
  step under the stage's namespace, and the stage output registered as a model version `<prefix>-<stage>` tagged
  with its lineage (data hash, base model, git commit, config hash, Kubeflow run id).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
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
# MLflow's defaults (120 s timeout, 7 retries, backoff 2) stall a stage for ~9 minutes on a dead server.
BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
OUTAGE_ENV = "RLHF_TRACKING_OUTAGE_S"
DEFAULT_OUTAGE_S = 300.0
RETRY_EVERY_S = 10.0


def bound_http_requests() -> None:
    """MLflow's HTTP timeout and retries bounded, unless the environment already chose them; the SQLite store's
    table-creation chatter silenced (it would precede a one-line error)."""
    import logging

    for name, value in BOUNDED_HTTP.items():
        os.environ.setdefault(name, value)
    for logger in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(logger).setLevel(logging.WARNING)


def tracking_failure_types() -> tuple[type[BaseException], ...]:
    """What a tracking call raises when the store is unreachable or misbehaves."""
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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
    """Raise UserError within `timeout` seconds if an http(s) tracking server does not answer its health check
    (or a SQLite store cannot be written: SQLAlchemy would retry it for minutes)."""
    if not is_http_url(uri):
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"MLflow store {uri}: cannot create {db.parent}: {exc.strerror}") from None
            if (db.exists() and not os.access(db, os.W_OK)) or not os.access(db.parent, os.W_OK):
                raise UserError(f"MLflow store {uri} is read-only: point MLFLOW_TRACKING_URI at a writable store")
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
    """An active MLflow run for one stage: log metrics (buffered through a short outage), register the output."""

    stage: str
    run_id: str
    prefix: str
    register_enabled: bool
    lineage: dict[str, str] = field(default_factory=dict)
    registered: list[dict[str, Any]] = field(default_factory=list)
    # metric key -> the last step the run already holds (a re-attached run): those steps are not logged again
    logged_steps: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    outage_since: float | None = None
    last_attempt: float = 0.0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if v is not None and (step is None or step > self.logged_steps.get(k, -1))
        }
        if clean:
            self.pending.append((clean, step))
        if self.outage_since is not None and time.monotonic() - self.last_attempt < RETRY_EVERY_S:
            self._check_outage()
            return
        self.flush()

    def flush(self, *, required: bool = False) -> None:
        """Send the buffered metrics; with `required`, an outage is an error at once (the caller needs the server)."""
        import mlflow

        self.last_attempt = time.monotonic()
        try:
            while self.pending:
                metrics, step = self.pending[0]
                mlflow.log_metrics(metrics, step=step)
                self.pending.pop(0)
        except tracking_failure_types() as exc:
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                tqdm_write(f"MLflow tracking unavailable ({first_line(exc)}): buffering metrics, training goes on")
            if required:
                raise UserError(
                    f"MLflow tracking server unavailable ({first_line(exc)}): the checkpoints are kept, rerun to finish"
                ) from None
            self._check_outage()
            return
        if self.outage_since is not None:
            tqdm_write("MLflow tracking is back: buffered metrics sent")
            self.outage_since = None

    def _check_outage(self) -> None:
        budget = float(os.environ.get(OUTAGE_ENV) or DEFAULT_OUTAGE_S)
        if self.outage_since is not None and time.monotonic() - self.outage_since > budget:
            raise UserError(
                f"MLflow tracking unavailable for more than {budget:.0f} s ({OUTAGE_ENV}): "
                "stopping; the checkpoints are kept, rerun to resume"
            )

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
        (`stages.registered_name`: `<prefix>-sft`, `<prefix>-reward`, `<prefix>-policy`) unless `name` is given.
        The training stages pass an MLflow model directory (modeling/mlflow_model.register_stage_model), so the
        version loads with `mlflow.transformers.load_model`; this layer only uploads and registers."""
        if not self.register_enabled:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        name = name or registered_name(self.prefix, self.stage)
        self.flush(required=True)
        client = MlflowClient()
        try:
            # A retry of a run that registered before it was killed: that version is the one, no second
            existing = client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'")
            if existing:
                version = max(existing, key=lambda v: int(v.version))
            else:
                mlflow.log_artifacts(str(local_dir), artifact_path)
                try:
                    client.create_registered_model(name)
                except MlflowException as exc:
                    if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                        raise
                all_tags = {**self.lineage, **(tags or {})}
                source = f"{mlflow.get_artifact_uri(artifact_path)}"
                version = client.create_model_version(name, source=source, run_id=self.run_id, tags=all_tags)
        except tracking_failure_types() as exc:
            raise UserError(
                f"registering {name} failed ({first_line(exc)}): the model and checkpoints are kept, rerun to finish"
            ) from None
        entry = {
            "name": name,
            "version": int(version.version),
            "uri": f"models:/{name}/{version.version}",
            "run_id": self.run_id,
        }
        self.registered.append(entry)
        return entry


def tqdm_write(text: str) -> None:
    import sys

    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


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


def _already_logged(client, run) -> dict[str, int]:
    """Each metric key's last step in `run` (what a re-attached run must not log again)."""
    return {key: max(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def _existing_run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except tracking_failure_types():
        return None


@contextmanager
def stage_run(
    cfg: TrackingOptions,
    stage: str,
    *,
    data_dir: str | Path | None = None,
    base_model: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Start (or attach to) the MLflow run for `stage`; fails fast if the tracking server is unreachable.
    `resume_run_id`: the run a previous attempt of this stage run created (re-attached when the store has it)."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_server(uri)
    bound_http_requests()
    try:
        with _stage_run(cfg, stage, uri, data_dir, base_model, resume_run_id) as run:
            yield run
    except tracking_failure_types() as exc:
        # the stage failed and ending its run failed too (the server is gone): the stage's error is the one to say
        cause = exc.__context__
        while cause is not None and isinstance(cause, tracking_failure_types()):
            cause = cause.__context__
        if cause is not None:
            raise cause from None
        if isinstance(exc, OSError) and not _from_tracking(exc):
            raise exc from None
        raise UserError(f"MLflow tracking {uri}: {first_line(exc)}") from None


def _from_tracking(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.RequestException)


@contextmanager
def _stage_run(cfg, stage, uri, data_dir, base_model, resume_run_id) -> Iterator[StageRun]:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    store = MlflowClient(tracking_uri=uri)

    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if experiment_id:
        try:
            store.get_experiment(experiment_id)
        except tracking_failure_types():
            raise UserError(f"MLFLOW_EXPERIMENT_ID={experiment_id}: no such experiment in {uri}") from None
    else:
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
        existing = _existing_run(store, run_id)
        if existing is None:
            raise UserError(f"MLFLOW_RUN_ID={run_id}: no such run in {uri}")
        active = mlflow.start_run(run_id=run_id)
    else:
        existing = _existing_run(store, resume_run_id)  # None: a fresh attempt, or the run lives in another store
        if existing is not None:
            active = mlflow.start_run(run_id=resume_run_id)
        else:
            active = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name or stage)
    with _run_id_in_environment(active.info.run_id, injected=bool(run_id)), active as run:
        mlflow.set_tags({f"rlhf.{k}": v for k, v in lineage.items()})
        params = _flat_params(stage, cfg.to_flat_dict())
        held = existing.data.params if existing is not None else {}
        # MLflow refuses to change a param: a retry keeps the first attempt's (identity fields cannot differ)
        mlflow.log_params({k: v for k, v in params.items() if k not in held})
        yield StageRun(
            stage=stage,
            run_id=run.info.run_id,
            prefix=cfg.registered_model_prefix,
            register_enabled=cfg.register_model,
            lineage=lineage,
            logged_steps=_already_logged(store, existing) if existing is not None else {},
        )


def client(tracking_uri: str | None = None):
    """The one MlflowClient builder for tools outside a stage run (the report step, `rlhf run`'s summary,
    `rlhf promote`): the stages' URI resolution ($MLFLOW_TRACKING_URI, else ./mlflow.db), checked reachable
    first, so an unreachable server fails in seconds with one line."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    bound_http_requests()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# Set by evaluate on a policy version it verified: the run that produced the evaluated model. Promote refuses a
# version whose own run differs (its gate values were measured on another run's model).
SOURCE_RUN_TAG = "eval/source_run_id"


def check_version_owner(client, name: str, version: str | int, run_id: str | None, what: str = "model"):
    """The ModelVersion `models:/<name>/<version>`, refused (one line) unless it exists and, when `run_id` is known,
    was registered by that run (the one that produced the model): a version number read from a metrics.json means
    nothing in another store, or after a re-registration."""
    uri = f"models:/{name}/{version}"
    try:
        found = client.get_model_version(name, str(version))
    except tracking_failure_types() as exc:
        raise UserError(f"{what} {uri} is not in the registry of {client.tracking_uri} ({first_line(exc)})") from None
    if run_id is not None and found.run_id != run_id:
        raise UserError(
            f"{what} {uri} belongs to run {found.run_id}, not to run {run_id} that produced the model "
            "(another tracking store, or a foreign version): refusing it"
        )
    return found


def _parse_model_uri(uri: str) -> tuple[str, str]:
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    if not uri.startswith("models:/") or not name or not version.isdigit():
        raise UserError(f"expected models:/<name>/<version>, got {uri}")
    return name, version


def check_policy_versions(policies: dict[str, str], first_policy_uri: str | None = None) -> None:
    """Before evaluate generates anything: every policy's registered version (from its stage output's metrics.json,
    or `first_policy_uri` for the first policy) must exist in the current registry and belong to the run that
    produced the model; verified versions get SOURCE_RUN_TAG, which `rlhf promote` checks."""
    from mlflow.tracking import MlflowClient

    from rlhf_pipeline.results import METRICS_FILE, StageResult

    client = MlflowClient()
    for index, (name, spec) in enumerate(policies.items()):
        registered = None
        root = Path(spec).expanduser()
        if not spec.startswith("models:/"):
            for stage_dir in (root, root.parent):
                if (stage_dir / METRICS_FILE).is_file():
                    versions = StageResult.read(stage_dir).registered
                    registered = versions[-1] if versions else None
                    break
        uri = first_policy_uri if index == 0 and first_policy_uri else (registered.uri if registered else None)
        if uri is None and spec.startswith("models:/"):
            uri = spec
        if uri is None:
            continue
        model_name, version = _parse_model_uri(uri)
        run_id = registered.run_id if registered is not None else None
        found = check_version_owner(client, model_name, version, run_id, what=f"policy {name}:")
        if run_id is not None:
            client.set_model_version_tag(model_name, version, SOURCE_RUN_TAG, run_id)
        elif found.tags.get(SOURCE_RUN_TAG) not in (None, found.run_id):
            raise UserError(f"policy {name}: {uri} was evaluated for run {found.tags[SOURCE_RUN_TAG]}, not its own")


def check_promotable(version) -> None:
    """Refuse a version whose gate values an evaluation measured on another run's model (SOURCE_RUN_TAG)."""
    source = (version.tags or {}).get(SOURCE_RUN_TAG)
    if source is not None and source != version.run_id:
        raise UserError(
            f"version {version.version} of {version.name} belongs to run {version.run_id}, but its gate values were "
            f"measured on the model of run {source}: refusing to promote it"
        )
