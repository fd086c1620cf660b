"""Small helpers around `kfp.Client` for `rlhf submit` and `rlhf schedule`: connect, fail fast, one-line errors.

Authentication comes from the environment only, never a flag (flags end up in shell history, CI logs and
`ps`): `$KF_PIPELINES_TOKEN` (or `$KFP_TOKEN`, which `rlhf submit` reads) as a bearer token; else, inside a
pod, the projected service-account token at `$KF_PIPELINES_SA_TOKEN_PATH`
(default /var/run/secrets/kubeflow/pipelines/token, which the helm Job mounts); else no credentials.

Credentials never travel where others can read them: a `--host` with `user:password@` and run parameters that
hold a credential (a URI with a password, a token) are refused, since parameters are shown to everyone in the
Kubeflow UI; and a token is sent over plain HTTP only to loopback or an in-cluster Service name.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.http_probe import TIMEOUT_S, is_http_url, probe
from rlhf_pipeline.secrets import find_credentials

TOKEN_ENVS = ("KF_PIPELINES_TOKEN", "KFP_TOKEN")
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT = "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ = "/apis/v2beta1/healthz"
DESCRIPTION = "StackLLaMA-style RLHF pipeline (rlhf-pipeline)"


def bearer_token() -> str | None:
    for env in TOKEN_ENVS:
        if os.environ.get(env):
            return os.environ[env]
    path = Path(os.environ.get(SA_TOKEN_PATH_ENV, SA_TOKEN_DEFAULT))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_reachable(host: str, timeout: float = TIMEOUT_S) -> None:
    """One line within `timeout` s unless the Kubeflow Pipelines API answers at `host` (kfp.Client would retry
    for half a minute and then print a traceback)."""
    if not is_http_url(host):
        raise UserError(f"--host must be an http(s) URL, got {host!r}")
    if "@" in urlsplit(host).netloc:
        raise UserError("--host must not carry credentials (user:password@): the token comes from $KF_PIPELINES_TOKEN")
    answer = probe(host.rstrip("/") + HEALTHZ, timeout)
    if not answer.reachable:
        raise UserError(f"Kubeflow Pipelines at {host} is unreachable ({answer.reason})")
    if not answer.healthy:
        raise UserError(
            f"{host} answered HTTP {answer.status} on {HEALTHZ}: not a Kubeflow Pipelines API "
            "endpoint (use the ml-pipeline service or the dashboard URL)"
        )


def connect(host: str, namespace: str | None = None):
    """The kfp.Client for `host` (checked reachable first), authenticated from the environment."""
    import kfp

    token = bearer_token()
    if token and not may_send_token(host):
        raise UserError(
            f"refusing to send the Kubeflow token over plain HTTP to {urlsplit(host).hostname}: use https://, "
            "or the in-cluster Service (http://ml-pipeline.kubeflow.svc.cluster.local:8888)"
        )
    check_reachable(host)
    kwargs: dict[str, Any] = {"host": host.rstrip("/"), "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    with warnings.catch_warnings(), quiet_stdout():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        try:
            return kfp.Client(**kwargs)
        except Exception as exc:  # noqa: BLE001 (healthz failures: ApiException, urllib3 errors)
            raise api_error(exc, f"connecting to {host}") from None


def may_send_token(host: str) -> bool:
    """Whether a bearer token may go to `host`: HTTPS, or plain HTTP that stays on this machine or inside the
    cluster (loopback, a one-label Service name, `*.svc`, `*.svc.cluster.local`)."""
    url = urlsplit(host)
    name = (url.hostname or "").lower()
    if url.scheme == "https":
        return True
    return name in ("localhost", "127.0.0.1", "::1") or "." not in name or name.endswith((".svc", ".svc.cluster.local"))


def refuse_credential_params(params: dict[str, Any]) -> None:
    """One line naming the parameter when a run parameter holds a credential (run parameters are stored with
    the run and shown in the Kubeflow UI)."""
    for place, kind in find_credentials(params):
        raise UserError(
            f"--param {place} holds {kind}: run parameters are visible to everyone in the Kubeflow UI; give the "
            "steps credentials from a Kubernetes Secret (compile settings `secrets:`)"
        )


def latest_version_id(client, pipeline_id: str, pipeline_name: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc")
    if not versions.pipeline_versions:
        raise UserError(f"pipeline '{pipeline_name}' has no versions")
    return versions.pipeline_versions[0].pipeline_version_id


def upload(
    client, package: Path, pipeline_name: str, version_name: str, namespace: str | None
) -> tuple[str, str, bool]:
    """Upload a compiled pipeline: the pipeline itself the first time, else a new version named `version_name`.
    Returns (pipeline id, version id, whether the pipeline was created). A package that holds a credential (one
    compiled elsewhere, or edited by hand) is refused before anything is sent."""
    from rlhf_pipeline.orchestration.compile import read_spec, refuse_credentials

    refuse_credentials(read_spec(package))
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            str(package), pipeline_name=pipeline_name, namespace=namespace, description=DESCRIPTION
        )
        return pipeline.pipeline_id, latest_version_id(client, pipeline.pipeline_id, pipeline_name), True
    version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id, False


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """kfp.Client prints "Experiment details: <link>" to stdout; keep stdout for our own (JSON) output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def api_error(exc: Exception, what: str) -> UserError:
    """kfp_server_api.ApiException (or a transport error) -> one line with the server's message."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    detail = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            detail = ": " + str(json.loads(body).get("message") or json.loads(body).get("error", ""))[:200]
        except (ValueError, AttributeError):
            detail = ": " + str(body).strip()[:200]
    code = f"HTTP {status} " if status else ""
    return UserError(f"{what} failed ({code}{reason}){detail}")


def is_api_error(exc: Exception) -> bool:
    return type(exc).__module__.split(".")[0] in ("kfp_server_api", "urllib3")
