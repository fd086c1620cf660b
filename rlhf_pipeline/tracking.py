"""MLflow tracking shared by every stage.

- Where: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else a local SQLite file (`./mlflow.db`, artifacts in
  `./mlartifacts`). `$MLFLOW_EXPERIMENT_ID` and `$MLFLOW_RUN_ID` are honoured when set (Kubeflow Pipelines 2.17
  injects them into task pods). MLflow itself removes `MLFLOW_RUN_ID` from the environment (start_run() without
  a run id, end_run()), so a process started later -- a worker rank, a child process, the next stage in the pod --
  would no longer see it: `stage_run` keeps a copy in `$RLHF_MLFLOW_RUN_ID` while the run is active (the active
  run's id, injected or not) and restores the environment it found when the run ends.
- Structure: one parent run per pipeline run, one nested run per stage (`run_under`). `rlhf run` creates the
  parent (`start_pipeline_run`, named `rlhf-pipeline <run id>`) and hands its id to every step in
  `$RLHF_MLFLOW_PARENT_RUN_ID`. On Kubeflow, an injected `$MLFLOW_RUN_ID` that is itself a nested run (the task's
  run, which the 2.17 plugin creates under its pipeline run) is the stage's run; an injected top-level run is the
  parent, and the stage opens a child of it. A standalone `rlhf <stage>` run is a top-level run.
- Also per stage run: system metrics (`system/...`, MLflow's sampler thread; it stops by itself when the server is
  gone), the data split it read as an MLflow dataset input (`log_input`, digest = the parquet's sha256).
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
PARENT_RUN_ENV = "RLHF_MLFLOW_PARENT_RUN_ID"  # the pipeline run's parent run (`rlhf run` sets it for every step)
PARENT_TAG = "mlflow.parentRunId"  # what makes a run nested (the UI draws the tree from it)
PIPELINE_NAME = "rlhf-pipeline"
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # "false" turns the system metrics off
# The experiment page: MLflow 3 opens an experiment without a kind on its GenAI (traces) page; this kind opens the
# runs table. The note is the experiment's description in the UI.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "RLHF pipeline (StackLLaMA-style): Stack Exchange preference pairs -> SFT (LoRA) -> reward model (+ judge) "
        "-> PPO and/or DPO -> evaluation against SFT.\n\n"
        "Each pipeline run is a parent run named `rlhf-pipeline <run id>`, with one nested run per stage "
        "(prepare-data, sft, reward, judge, ppo/dpo, evaluate). The run report (`report/report.md`, "
        "`report/report.html`) is an artifact of the parent run; the data splits are the stage runs' dataset "
        "inputs; the models are registered as `<prefix>-sft`, `<prefix>-reward`, `<prefix>-policy`."
    ),
}
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
    table-creation chatter silenced (it would precede a one-line error); and MLflow's "View run at" lines kept off
    stdout, which holds the stage's JSON summary (`rlhf sft ... | jq` must parse)."""
    import logging

    for name, value in BOUNDED_HTTP.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # (and the system-metrics sampler's start/stop lines, on every stage)
    for logger in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.system_metrics"):
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

    def log_input(self, data_dir: str | Path | None, subset: str, context: str) -> None:
        """`<data_dir>/<subset>.parquet` as a dataset input of this run (context "training" or "evaluation"); a
        split that is not there (an H4 input without it, a standalone test) is skipped."""
        path = Path(data_dir or "") / f"{subset}.parquet"
        if data_dir and path.is_file():
            log_dataset(path, subset, context)

    def register(
        self,
        local_dir: str | Path,
        *,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        artifact_path: str = "model",
    ) -> dict[str, Any] | None:
        """Upload `local_dir` as a logged model of the run (named `artifact_path`) and register it as a new version
        of the stage's registered model (`stages.registered_name`: `<prefix>-sft`, `<prefix>-reward`,
        `<prefix>-policy`) unless `name` is given. The training stages pass an MLflow model directory
        (modeling/mlflow_model.register_stage_model), so the version loads with `mlflow.transformers.load_model`;
        this layer only uploads and registers."""
        if not self.register_enabled:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        name = name or registered_name(self.prefix, self.stage)
        self.flush(required=True)
        client = MlflowClient()
        try:
            # A retry of a run that registered before it was killed: that version is the one, no second
            existing = client.search_model_versions(f"name='{name}' and run_id='{self.run_id}'")
            if existing:
                version = max(existing, key=lambda v: int(v.version))
            else:
                all_tags = {**self.lineage, **(tags or {})}
                # An MLflow 3 logged model of this run (its "Logged models" tab, the version's source model), as
                # a flavor's log_model makes one: created pending, given the files, then marked ready.
                logged = mlflow.initialize_logged_model(
                    name=artifact_path, source_run_id=self.run_id, tags=all_tags, model_type=self.stage
                )
                try:
                    client.log_model_artifacts(logged.model_id, str(local_dir))
                except BaseException:
                    mlflow.finalize_logged_model(logged.model_id, "FAILED")  # not a model to load: say so
                    raise
                mlflow.finalize_logged_model(logged.model_id, "READY")
                try:
                    client.create_registered_model(name)
                except MlflowException as exc:
                    if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                        raise
                version = client.create_model_version(
                    name, source=logged.model_uri, run_id=self.run_id, tags=all_tags, model_id=logged.model_id
                )
                # what `mlflow.register_model` records: the logged model's page links to its version
                versions = [{"name": name, "version": version.version}]
                client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
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


def file_sha256(path: str | Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# MLflow stores a dataset digest in 36 characters: the sha256's first 32 hex digits; the whole one is a tag.
DIGEST_CHARS = 32


def log_dataset(path: Path, name: str, context: str) -> None:
    """One parquet split as an MLflow dataset input of the active run: its schema and row count, the file as the
    source, its sha256 as the digest (what ties a model to the exact bytes it was trained or evaluated on)."""
    import warnings

    import mlflow
    import pandas as pd

    sha = file_sha256(path)
    # MLflow warns that a local path "can be interpreted in multiple ways" (both are its local-file source) and that
    # integer columns cannot hold missing values (ours hold none): neither says anything about this data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            pd.read_parquet(path),
            source=str(path.resolve()),
            name=name,
            digest=sha[:DIGEST_CHARS],
        )
        mlflow.log_input(dataset, context=context, tags={"sha256": sha})


def numeric_leaves(data: Any, prefix: str) -> dict[str, float]:
    """The numbers of a nested dict as `prefix/a/b` -> float (booleans and everything else left out)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}"))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix] = float(data)
    return out


def tracking_configured() -> bool:
    """Whether this process was told where to track (a stage without tracking flags, prepare-data, tracks only
    then, rather than leave a ./mlflow.db wherever it runs)."""
    return any(os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", RUN_ID_ENV, RUN_ID_COPY_ENV))


@contextmanager
def data_run(cfg: StageConfig) -> Iterator[StageRun | None]:
    """prepare-data's run (None when `tracking_configured()` is false): opened before the work, so an unreachable
    server fails in seconds; `log_prepared_data` fills it once the splits are written."""
    if not tracking_configured():
        yield None
        return
    with stage_run(cfg, "prepare_data") as run:
        yield run


def log_prepared_data(run: StageRun | None, output_dir: str | Path, summary: dict[str, Any]) -> None:
    """The stats.json counts as `data/...` metrics and every split written as a dataset input (context "output":
    this run wrote it; the stages that read a split log it again with "training" or "evaluation")."""
    if run is None:
        return
    counts = {k: v for k, v in summary.items() if k not in ("config", "inputs")}
    run.log_metrics(numeric_leaves(counts, "data"))
    run.flush(required=True)
    for split in sorted(Path(output_dir).glob("*.parquet")):
        log_dataset(split, split.stem, "output")


def injected_run_id() -> str | None:
    """The MLflow run this process belongs to, if someone else created it: `$MLFLOW_RUN_ID` (Kubeflow), else the
    copy `$RLHF_MLFLOW_RUN_ID` (kept by a parent's `stage_run`, or passed to a TrainJob's pods)."""
    return os.environ.get(RUN_ID_ENV) or os.environ.get(RUN_ID_COPY_ENV) or None


@contextmanager
def _saved_run_environment() -> Iterator[None]:
    """Afterwards, `$MLFLOW_RUN_ID` and `$RLHF_MLFLOW_RUN_ID` as they were (an injected `$MLFLOW_RUN_ID` put back
    after MLflow's end_run() removed it), whatever the run set in between."""
    saved = {name: os.environ.get(name) for name in (RUN_ID_ENV, RUN_ID_COPY_ENV)}
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
    cfg: StageConfig,
    stage: str,
    *,
    data_dir: str | Path | None = None,
    base_model: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Start (or attach to) the MLflow run for `stage` (`run_plan`); fails fast if the tracking server is unreachable.
    `cfg`: the stage's config, its TrackingOptions fields (defaults where it has none, as prepare-data).
    `resume_run_id`: the run a previous attempt of this stage run created (re-attached when the store has it)."""
    uri = resolve_tracking_uri(_setting(cfg, "tracking_uri"))
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


def _setting(cfg, name: str):
    """A TrackingOptions field of `cfg`, or its default for a config without tracking fields (prepare-data)."""
    return getattr(cfg, name, TrackingOptions.model_fields[name].default)


def default_run_name(cfg, stage: str) -> str:
    """`--run-name`, else the step's name: the judge is the reward stage on the judge subset."""
    if _setting(cfg, "run_name"):
        return _setting(cfg, "run_name")
    return "judge" if stage == "reward" and getattr(cfg, "subset", None) == "judge" else stage


def system_metrics_enabled() -> bool:
    """On unless `$MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` says false (psutil is a dependency)."""
    return os.environ.get(SYSTEM_METRICS_ENV, "true").strip().lower() not in ("false", "0", "no")


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment `name` (created when missing, concurrently safe), with the description and the runs-table kind
    unless it already has its own."""
    import mlflow
    from mlflow.tracking import MlflowClient

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):  # keep local artifacts next to the database, not in the cwd
            db_path = Path(uri.removeprefix("sqlite:///")).resolve()  # relative to the cwd, as SQLAlchemy reads it
            artifact_location = (db_path.parent / "mlartifacts").as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            experiment = mlflow.get_experiment_by_name(name)
    client = MlflowClient(tracking_uri=uri)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:  # an experiment made before these tags, or by hand: fill in, never overwrite
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@dataclass
class RunPlan:
    """Which MLflow run a stage process logs to: `attach` to an existing run, or a new one (under `parent`)."""

    attach: str | None = None
    parent: str | None = None
    experiment_id: str | None = None


def run_plan(store, uri: str, resume_run_id: str | None) -> tuple[RunPlan, Any]:
    """The run this stage process uses, and the existing run it re-attaches to (None for a new run):
    - `$MLFLOW_RUN_ID` (Kubeflow): a nested run (the task's run) is attached to; a top-level run is the parent;
    - `$RLHF_MLFLOW_RUN_ID` alone: the run of the stage this process belongs to (a worker rank, a TrainJob pod);
    - `resume_run_id` (the first attempt's run, training/claim.py): re-attached when the store has it;
    - `$RLHF_MLFLOW_PARENT_RUN_ID` (`rlhf run`): a new nested run under it, in its experiment;
    - else a new top-level run."""
    injected = os.environ.get(RUN_ID_ENV)
    if injected:
        run = _existing_run(store, injected)
        if run is None:
            raise UserError(f"MLFLOW_RUN_ID={injected}: no such run in {uri}")
        if PARENT_TAG in run.data.tags or "rlhf.stage" in run.data.tags:  # a task's run, or one of our stage runs
            return RunPlan(attach=injected), run
        return _child_of(store, run, resume_run_id)
    own = os.environ.get(RUN_ID_COPY_ENV)
    if own:
        run = _existing_run(store, own)
        if run is None:
            raise UserError(f"{RUN_ID_COPY_ENV}={own}: no such run in {uri}")
        return RunPlan(attach=own), run
    previous = _existing_run(store, resume_run_id)  # None: a fresh attempt, or the run lives in another store
    if previous is not None:
        return RunPlan(attach=resume_run_id), previous
    parent_id = os.environ.get(PARENT_RUN_ENV)
    if parent_id:
        parent = _existing_run(store, parent_id)
        if parent is None:
            raise UserError(f"{PARENT_RUN_ENV}={parent_id}: no such run in {uri}")
        return _child_of(store, parent, None)
    return RunPlan(), None


def _child_of(store, parent, resume_run_id: str | None) -> tuple[RunPlan, Any]:
    """A new nested run under `parent`, or the first attempt's child of that same parent (a retry)."""
    previous = _existing_run(store, resume_run_id)
    if previous is not None and previous.data.tags.get(PARENT_TAG) == parent.info.run_id:
        return RunPlan(attach=resume_run_id), previous
    return RunPlan(parent=parent.info.run_id, experiment_id=parent.info.experiment_id), None


@contextmanager
def _stage_run(cfg, stage, uri, data_dir, base_model, resume_run_id) -> Iterator[StageRun]:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    store = MlflowClient(tracking_uri=uri)

    lineage = {
        "data_hash": data_hash(data_dir) if data_dir else "unknown",
        "base_model": redact(base_model or "unknown"),  # tags too: a model URL may carry a password
        "git_commit": git_commit(),
        "config_hash": cfg.config_hash(),
        "stage": stage,
    }
    kfp_run_id = _setting(cfg, "kfp_run_id") or os.environ.get("KFP_RUN_ID")
    if kfp_run_id:
        lineage["kfp_run_id"] = kfp_run_id

    plan, existing = run_plan(store, uri, resume_run_id)
    experiment_id = plan.experiment_id or os.environ.get("MLFLOW_EXPERIMENT_ID")
    if plan.attach is None and experiment_id is None:
        experiment_id = ensure_experiment(_setting(cfg, "experiment_name"), uri)
    elif plan.attach is None and plan.parent is None:
        try:
            store.get_experiment(experiment_id)
        except tracking_failure_types():
            raise UserError(f"MLFLOW_EXPERIMENT_ID={experiment_id}: no such experiment in {uri}") from None

    with _saved_run_environment():
        os.environ.pop(RUN_ID_ENV, None)  # start_run() would resume the run it names instead of the planned one
        tags = {f"rlhf.{k}": v for k, v in lineage.items()}  # at creation: a child process sees a stage run
        system_metrics = system_metrics_enabled()
        if plan.attach is not None:
            active = mlflow.start_run(run_id=plan.attach, tags=tags, log_system_metrics=system_metrics)
        else:
            active = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=default_run_name(cfg, stage),
                parent_run_id=plan.parent,
                tags=tags,
                log_system_metrics=system_metrics,
            )
        # processes started during the run (worker ranks, children) attach to it, under both names
        os.environ[RUN_ID_COPY_ENV] = os.environ[RUN_ID_ENV] = active.info.run_id
        with active as run:
            params = _flat_params(stage, cfg.to_flat_dict())
            held = existing.data.params if existing is not None else {}
            # MLflow refuses to change a param: a retry keeps the first attempt's (identity fields cannot differ)
            mlflow.log_params({k: v for k, v in params.items() if k not in held})
            yield StageRun(
                stage=stage,
                run_id=run.info.run_id,
                prefix=_setting(cfg, "registered_model_prefix"),
                register_enabled=_setting(cfg, "register_model"),
                lineage=lineage,
                logged_steps=_already_logged(store, existing) if existing is not None else {},
            )


@dataclass
class PipelineRun:
    """The parent run of one pipeline run (`rlhf run`); the stage runs nest under it."""

    uri: str
    experiment_id: str
    run_id: str

    def ui_url(self) -> str:
        """The parent run's page in the MLflow UI: the tracking server's own, else a local `mlflow ui` (port 5000)."""
        from urllib.parse import urlsplit, urlunsplit

        base = "http://127.0.0.1:5000"
        if is_http_url(self.uri):
            parts = urlsplit(self.uri)
            base = urlunsplit(
                (
                    parts.scheme,
                    parts.hostname + (f":{parts.port}" if parts.port else ""),
                    parts.path.rstrip("/"),
                    "",
                    "",
                )
            )
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def pipeline_run_name(kfp_run_id: str) -> str:
    """`rlhf-pipeline <run id>`; kfp.local's ids already start with the pipeline's name, which is not repeated."""
    return f"{PIPELINE_NAME} {kfp_run_id.removeprefix(PIPELINE_NAME + '-')}"


def start_pipeline_run(
    tracking_uri: str, experiment_name: str, run_name: str, params: dict[str, Any] | None = None
) -> PipelineRun:
    """Create the parent run (status RUNNING) in `experiment_name`; its id goes to the steps in `$PARENT_RUN_ENV`.
    Nothing is made active in this process: the steps are other processes."""
    import mlflow

    c = client(tracking_uri)
    uri = c.tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = ensure_experiment(experiment_name, uri)
        run = c.create_run(
            experiment_id, run_name=run_name, tags={"rlhf.pipeline": PIPELINE_NAME, "rlhf.git_commit": git_commit()}
        )
        for key, value in _flat_params("pipeline", params or {}).items():
            c.log_param(run.info.run_id, key, value)
    except tracking_failure_types() as exc:
        raise UserError(f"MLflow tracking {redact(uri)}: {first_line(exc)}") from None
    return PipelineRun(uri=uri, experiment_id=experiment_id, run_id=run.info.run_id)


def finish_pipeline_run(
    run: PipelineRun,
    *,
    succeeded: bool,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    artifacts: list[Path] = (),
) -> None:
    """End the parent run (FINISHED or FAILED), renamed once the pipeline's run id is known, with `artifacts` (the
    report) under `report/`. Best effort on failure: a tracking error here is one warning line, the pipeline's own
    outcome is what the caller reports."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=run.uri, registry_uri=run.uri)
    try:
        for path in artifacts:
            if Path(path).is_file():
                c.log_artifact(run.run_id, str(path), "report")
        for key, value in (tags or {}).items():
            c.set_tag(run.run_id, key, value)
        if run_name:
            c.update_run(run.run_id, name=run_name)
        c.set_terminated(run.run_id, "FINISHED" if succeeded else "FAILED")
    except tracking_failure_types() as exc:
        tqdm_write(f"MLflow: closing the pipeline run {run.run_id} failed ({first_line(exc)})")


def kubeflow_pipeline_run_id(store) -> str | None:
    """On Kubeflow, the pipeline's MLflow run, from the injected `$MLFLOW_RUN_ID`: its parent when it is a task's
    nested run (the 2.17 plugin's layout), else that run itself. None without one: `rlhf run` logs its report to
    the parent run it made itself (`finish_pipeline_run`)."""
    injected = os.environ.get(RUN_ID_ENV)
    run = _existing_run(store, injected)
    if run is None:
        return None
    return run.data.tags.get(PARENT_TAG) or injected


def log_pipeline_report(store, files: dict[str, Path]) -> str | None:
    """`files` (name in the run -> local file; KFP's artifact files have no extension) under `report/` of the
    pipeline's run on Kubeflow (`kubeflow_pipeline_run_id`); the run id, or None where there is none. Best effort:
    a tracking error is one warning line (the report is the step's own artifact anyway)."""
    import shutil
    import tempfile

    try:
        run_id = kubeflow_pipeline_run_id(store)
        if run_id is None:
            return None
        with tempfile.TemporaryDirectory(prefix="rlhf-report-") as tmp:
            for name, path in files.items():
                if Path(path).is_file():
                    shutil.copyfile(path, Path(tmp) / name)
            store.log_artifacts(run_id, tmp, "report")
    except tracking_failure_types() as exc:
        tqdm_write(f"MLflow: logging the report to the pipeline run failed ({first_line(exc)})")
        return None
    return run_id


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
