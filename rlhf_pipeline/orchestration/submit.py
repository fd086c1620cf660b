"""`rlhf submit`: upload the compiled pipeline to a Kubeflow Pipelines server (a new pipeline, or a new version of
the existing one) and start a run in an experiment.

Authentication comes from the environment only (never a flag, so it stays out of shell history and CI logs):
`KF_PIPELINES_TOKEN` or `KFP_TOKEN` (a bearer token, looked up in that order by kfp_client.bearer_token, as for `rlhf schedule`), else the projected service-account token
(`ops.kfp_client.bearer_token`), else whatever kfp.Client itself picks up (its context file). An unreachable
host fails in seconds with one line.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration.kfp_client import (
    api_error,
    check_reachable,
    connect,
    is_api_error,
    refuse_credential_params,
    upload,
)
from rlhf_pipeline.orchestration.pipeline_params import check_run_arguments, parse_params, read_params_file


def submit(
    *,
    host: str,
    package: Path,
    pipeline_name: str,
    version_name: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    namespace: str | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Upload `package` (new pipeline, or new version of `pipeline_name`) and start a run; returns ids."""
    logging.disable(logging.ERROR)  # kfp.Client logs a traceback per failed attempt; we report one line
    try:
        client = client or connect(host, namespace)
        pipeline_id, version_id, created = upload(client, package, pipeline_name, version_name, namespace)
        exp = client.create_experiment(experiment, namespace=namespace)
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=run_name,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    except UserError:
        raise
    except Exception as exc:  # kfp_server_api.ApiException, urllib3 errors: one line, no traceback
        if is_api_error(exc) or isinstance(exc, (ValueError, OSError)):
            raise api_error(exc, f"talking to {host}") from None
        raise
    finally:
        logging.disable(logging.NOTSET)
    return {
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "uploaded": "pipeline" if created else "version",
        "experiment_id": exp.experiment_id,
        "run_id": run.run_id,
        "run_url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
    }


def default_version_name() -> str:
    """<git commit>-<time>: which code a pipeline version was compiled from, and when."""
    from rlhf_pipeline.tracking import git_commit

    commit = git_commit()
    return f"{commit[:12] if commit != 'unknown' else 'dev'}-{time.strftime('%Y%m%d-%H%M%S')}"


def submit_pipeline(
    *,
    host: str,
    params: tuple[str, ...],
    package: str | None,
    params_file: str | None = None,
    settings_path: str | None,
    trainjob: bool,
    pipeline_name: str,
    version_name: str | None,
    run_name: str | None,
    experiment: str,
    namespace: str | None,
) -> dict[str, Any]:
    """`rlhf submit`: fail fast on the host, compile unless given a `package`, check `params` (over the
    `params_file`'s) against the pipeline's parameters and build every stage's config from them, upload and start
    the run."""
    from rlhf_pipeline.orchestration.compile import compile_to, read_spec

    from_file = read_params_file(params_file) if params_file else {}
    refuse_credential_params(dict(p.partition("=")[::2] for p in params))  # before any request or compile
    refuse_credential_params(from_file)
    check_reachable(host)  # before compiling: an unreachable host should cost seconds, not a compile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(package) if package else compile_to(Path(tmp) / "rlhf_pipeline.yaml", settings_path, trainjob)
        spec = read_spec(path)[0]
        known = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        args = parse_params(params, known, base=from_file)
        refuse_credential_params(args)
        check_run_arguments(args, known)  # a bad stage option fails here, not in the run's first step
        alignment = args.get("alignment", known.get("alignment", {}).get("defaultValue", "ppo"))
        return submit(
            host=host,
            package=path,
            pipeline_name=pipeline_name,
            version_name=version_name or default_version_name(),
            experiment=experiment,
            run_name=run_name or f"rlhf-{alignment}-{time.strftime('%Y%m%d-%H%M%S')}",
            params=args,
            namespace=namespace,
        )
