"""The one way tools outside a stage run (the report step, `rlhf run`'s summary, `rlhf promote`) get an MLflow
client: the same URI resolution as the stages, and an unreachable server fails in seconds with one line."""

from __future__ import annotations

from rlhf_pipeline.tracking import check_tracking_server, resolve_tracking_uri


def connect(tracking_uri: str | None = None):
    """An MlflowClient for tracking and registry at `tracking_uri` (else $MLFLOW_TRACKING_URI, else
    ./mlflow.db), checked reachable first."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
