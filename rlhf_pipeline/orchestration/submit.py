"""`rlhf submit`: upload the compiled pipeline to a Kubeflow Pipelines server (a new pipeline, or a new version of
the existing one) and start a run in an experiment.

Authentication comes from the environment only (never a flag, so it stays out of shell history and CI logs):
`KFP_TOKEN` or `KF_PIPELINES_TOKEN` (a bearer token), else the projected service-account token
(`ops.kfp_client.bearer_token`), else whatever kfp.Client itself picks up (its context file). An unreachable host fails in seconds with one line.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ops.kfp_client import api_error, bearer_token

HEALTH_PATH = "/apis/v2beta1/healthz"
TIMEOUT_S = 5.0


def parse_params(pairs: tuple[str, ...] | list[str], known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`k=v` pairs -> pipeline arguments. Values are JSON when they parse as JSON (objects, lists, numbers,
    booleans), else strings; the type is checked against the pipeline's parameter definitions."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--param {pair!r}: expected NAME=VALUE")
        name, raw = pair.split("=", 1)
        name = name.strip()
        if name not in known:
            raise UserError(f"--param {name}: not a pipeline parameter (known: {', '.join(sorted(known))})")
        kind = known[name].get("parameterType", "STRING")
        if kind == "STRING":
            value: Any = raw
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise UserError(f"--param {name}: expected a JSON {kind.lower()}, got {raw!r}") from None
            expected = {"STRUCT": dict, "LIST": list, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float),
                        "BOOLEAN": bool}.get(kind)
            if expected is not None and (not isinstance(value, expected) or
                                         (kind == "NUMBER_INTEGER" and isinstance(value, bool))):
                raise UserError(f"--param {name}: expected a JSON {kind.lower()}, got {raw!r}")
        out[name] = value
    if "alignment" in out and out["alignment"] not in ("ppo", "dpo"):
        raise UserError(f"--param alignment must be ppo or dpo, got {out['alignment']!r}")
    return out


def check_reachable(host: str, timeout: float = TIMEOUT_S) -> None:
    """One-line UserError unless something answers HTTP at `host` (any HTTP status counts as reachable)."""
    if not host.startswith(("http://", "https://")):
        raise UserError(f"--host must be an http(s) URL, got {host!r}")
    url = host.rstrip("/") + HEALTH_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (the user's own server)
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # an auth proxy in front of the API: the server is there
            return
        raise UserError(f"{host} answered HTTP {exc.code} on {HEALTH_PATH}: not a Kubeflow Pipelines API "
                        "endpoint (use the ml-pipeline service or the dashboard URL)") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"Kubeflow Pipelines at {host} is unreachable ({reason})") from None


def make_client(host: str, namespace: str | None):
    import warnings

    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        kwargs: dict[str, Any] = {"host": host, "existing_token": bearer_token()}
        if namespace:
            kwargs["namespace"] = namespace
        return kfp.Client(**kwargs)


def submit(*, host: str, package: Path, pipeline_name: str, version_name: str, experiment: str,
           run_name: str, params: dict[str, Any], namespace: str | None = None, client: Any = None) -> dict[str, Any]:
    """Upload `package` (new pipeline, or new version of `pipeline_name`) and start a run; returns ids."""
    if client is None:
        check_reachable(host)
    logging.disable(logging.ERROR)  # kfp.Client logs a traceback per failed attempt; we report one line
    try:
        client = client or make_client(host, namespace)
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace,
                                              description="StackLLaMA-style RLHF pipeline (rlhf-pipeline)")
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1)
            version_id = versions.pipeline_versions[0].pipeline_version_id
            uploaded = "pipeline"
        else:
            version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name,
                                                     pipeline_id=pipeline_id)
            version_id = version.pipeline_version_id
            uploaded = "version"
        exp = client.create_experiment(experiment, namespace=namespace)
        run = client.run_pipeline(experiment_id=exp.experiment_id, job_name=run_name, params=params,
                                  pipeline_id=pipeline_id, version_id=version_id)
    except UserError:
        raise
    except Exception as exc:  # kfp_server_api.ApiException, urllib3 errors: one line, no traceback
        if type(exc).__module__.startswith(("kfp_server_api", "urllib3")) or isinstance(exc, (ValueError, OSError)):
            raise api_error(exc, f"talking to {host}") from None
        raise
    finally:
        logging.disable(logging.NOTSET)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "uploaded": uploaded,
            "experiment_id": exp.experiment_id, "run_id": run.run_id,
            "run_url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def _default_version_name() -> str:
    from rlhf_pipeline.tracking import git_commit

    commit = git_commit()
    return f"{commit[:12] if commit != 'unknown' else 'dev'}-{time.strftime('%Y%m%d-%H%M%S')}"


@click.command("submit", context_settings={"max_content_width": 110})
@click.option("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 "
              "(token from $KFP_TOKEN).")
@click.option("--experiment", default="rlhf-pipeline", show_default=True, help="Experiment of the run.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Pipeline argument (repeatable); JSON for objects/lists/numbers, e.g. "
                   "--param alignment=dpo --param 'sft_config={\"max_steps\": 500}'.")
@click.option("--package", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Compiled pipeline YAML to upload [default: compile now with --settings].")
@click.option("--settings", "settings_path", type=click.Path(dir_okay=False), default=None,
              help="Kubernetes settings YAML for the compile (see `rlhf compile`).")
@click.option("--trainjob", is_flag=True, default=False, help="Compile with TrainJob training steps.")
@click.option("--pipeline-name", default="rlhf-pipeline", show_default=True, help="Pipeline name on the server.")
@click.option("--version-name", default=None, help="Pipeline version name [default: <git commit>-<time>].")
@click.option("--run-name", default=None, help="Run name [default: rlhf-<alignment>-<time>].")
@click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs).")
def command(host: str, experiment: str, params: tuple[str, ...], package: str | None, settings_path: str | None,
            trainjob: bool, pipeline_name: str, version_name: str | None, run_name: str | None,
            namespace: str | None) -> int:
    """Upload the pipeline (or a new version of it) to Kubeflow and start a run."""
    from rlhf_pipeline.orchestration.compile import compile_to, read_spec

    check_reachable(host)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(package) if package else compile_to(Path(tmp) / "rlhf_pipeline.yaml", settings_path, trainjob)
        spec = read_spec(path)[0]
        known = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        args = parse_params(params, known)
        alignment = args.get("alignment", known.get("alignment", {}).get("defaultValue", "ppo"))
        result = submit(host=host, package=path, pipeline_name=pipeline_name,
                        version_name=version_name or _default_version_name(), experiment=experiment,
                        run_name=run_name or f"rlhf-{alignment}-{time.strftime('%Y%m%d-%H%M%S')}",
                        params=args, namespace=namespace)
    click.echo(f"uploaded {result['uploaded']} ({pipeline_name}, version {result['version_id']}); "
               f"started run {result['run_id']} in experiment {experiment!r}")
    click.echo(result["run_url"])
    return 0
