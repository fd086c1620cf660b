"""`rlhf schedule`: create, list and delete recurring runs (scheduled retraining) through the KFP API.

    rlhf schedule create --host URL --name weekly-retrain --cron "0 3 * * 1" \\
        [--pipeline-name rlhf-pipeline] [--version-id ID | --package pipeline.yaml] [--param k=v ...]
    rlhf schedule list   --host URL [--experiment NAME]
    rlhf schedule delete --host URL (--id ID | --name NAME)

`create` runs the given pipeline version, by default the newest version of `--pipeline-name`; with
`--package` it first uploads that compiled YAML as a new version (creating the pipeline if needed) and
schedules exactly that version. KFP has no "update" for recurring runs, so with `--replace` (default) the
new recurring run is created first and older ones of the same name in the experiment are deleted after
it: a failed create never leaves the pipeline unscheduled; for that moment both exist.

The host may also come from $KF_PIPELINES_ENDPOINT; the token only from the environment (see kfp_client).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration.kfp_client import (
    api_error,
    connect,
    is_api_error,
    latest_version_id,
    quiet_stdout,
    refuse_credential_params,
    upload,
)
from rlhf_pipeline.orchestration.pipeline_params import parse_params


def normalize_cron(expr: str) -> str:
    """KFP's scheduler (robfig/cron) takes 6 fields, seconds first; accept the usual 5 and add "0"."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise UserError(f"--cron {expr!r}: expected 5 fields (min hour day month weekday) or 6 (seconds first)")
    return " ".join(fields)


def _experiment_id(client, name: str, namespace: str | None, create: bool) -> str | None:
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError as exc:
        if not str(exc).startswith("No experiment is found"):
            raise UserError(str(exc)) from None
    if not create:
        return None
    return client.create_experiment(name, namespace=namespace).experiment_id


def _by_name(client, experiment_id: str, name: str) -> list:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, filter=flt, page_size=100, page_token=token)
        found += [r for r in (page.recurring_runs or []) if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found


def _create(
    client,
    *,
    name: str,
    cron: str,
    experiment: str,
    pipeline_name: str,
    version_id: str | None,
    package: Path | None,
    version_name: str | None,
    params: dict[str, Any],
    namespace: str | None,
    max_concurrency: int,
    catchup: bool,
    enabled: bool,
    service_account: str | None,
    replace: bool,
) -> dict[str, Any]:
    cron = normalize_cron(cron)
    if package is not None:
        pipeline_id, version_id, _ = upload(
            client, package, pipeline_name, version_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", namespace
        )
    else:
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            raise UserError(f"pipeline '{pipeline_name}' not found (upload it with --package or `rlhf submit`)")
        version_id = version_id or latest_version_id(client, pipeline_id, pipeline_name)
    experiment_id = _experiment_id(client, experiment, namespace, create=True)
    previous = _by_name(client, experiment_id, name) if replace else []
    run = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        cron_expression=cron,
        params=params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        max_concurrency=max_concurrency,
        no_catchup=not catchup,
        enabled=enabled,
        service_account=service_account,
        description=f"rlhf schedule: {pipeline_name} version {version_id}",
    )
    for old in previous:
        client.delete_recurring_run(old.recurring_run_id)
    return {
        "recurring_run_id": run.recurring_run_id,
        "name": name,
        "cron": cron,
        "experiment_id": experiment_id,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "parameters": params,
        "replaced": [old.recurring_run_id for old in previous],
    }


def _call(host: str, fn, *args, **kwargs):
    """Run an API call with kfp's chatter off stdout and API errors as one line."""
    try:
        with quiet_stdout():
            return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (only API/transport errors are translated; the rest re-raise)
        if is_api_error(exc):
            raise api_error(exc, f"talking to {host}") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# The three subcommands: bad input fails before any network call
# ----------------------------------------------------------------------------------------------------------


def create(
    *,
    host: str,
    namespace: str | None,
    experiment: str,
    name: str,
    cron: str,
    pipeline_name: str,
    version_id: str | None,
    package: Path | None,
    version_name: str | None,
    params: tuple[str, ...],
    max_concurrency: int,
    catchup: bool,
    enabled: bool,
    service_account: str | None,
    replace: bool,
) -> dict[str, Any]:
    """Create (or replace) a recurring run of a pipeline version; returns its ids and what it replaced."""
    if package is not None and version_id is not None:
        raise UserError("--package and --version-id are exclusive: the uploaded version is the one scheduled")
    normalize_cron(cron)
    args = parse_params(params)
    refuse_credential_params(args)
    client = connect(host, namespace)
    return _call(
        host,
        _create,
        client,
        name=name,
        cron=cron,
        experiment=experiment,
        pipeline_name=pipeline_name,
        version_id=version_id,
        package=package,
        version_name=version_name,
        params=args,
        namespace=namespace,
        max_concurrency=max_concurrency,
        catchup=catchup,
        enabled=enabled,
        service_account=service_account,
        replace=replace,
    )


def list_recurring(*, host: str, namespace: str | None, experiment: str | None) -> list[dict[str, Any]]:
    """Every recurring run (of `experiment` when given), one row each."""
    client = connect(host, namespace)
    experiment_id = None
    if experiment:
        experiment_id = _call(host, _experiment_id, client, experiment, namespace, create=False)
        if experiment_id is None:
            raise UserError(f"experiment '{experiment}' not found")
    rows, token = [], ""
    while True:
        page = _call(
            host,
            client.list_recurring_runs,
            experiment_id=experiment_id,
            namespace=namespace,
            page_size=100,
            page_token=token,
        )
        for r in page.recurring_runs or []:
            trigger = r.trigger
            cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
            version = r.pipeline_version_reference.pipeline_version_id if r.pipeline_version_reference else None
            rows.append(
                {
                    "recurring_run_id": r.recurring_run_id,
                    "name": r.display_name,
                    "cron": cron,
                    "mode": r.mode,
                    "experiment_id": r.experiment_id,
                    "version_id": version,
                }
            )
        token = page.next_page_token or ""
        if not token:
            return rows


def delete(*, host: str, namespace: str | None, experiment: str, run_id: str | None, name: str | None) -> Iterator[str]:
    """Delete a recurring run by id, or every one of `name` in `experiment`. What to delete is checked first;
    the deletions then happen as the result is iterated, each id yielded once it is gone (so the caller reports
    progress even if a later deletion fails)."""
    if (run_id is None) == (name is None):
        raise UserError("give exactly one of --id or --name")
    client = connect(host, namespace)
    if run_id is not None:
        try:
            with quiet_stdout():
                client.get_recurring_run(run_id)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "status", None) == 404:
                raise UserError(f"recurring run '{run_id}' not found") from None
            if is_api_error(exc):
                raise api_error(exc, f"talking to {host}") from None
            raise
        ids = [run_id]
    else:
        experiment_id = _call(host, _experiment_id, client, experiment, namespace, create=False)
        found = _call(host, _by_name, client, experiment_id, name) if experiment_id else []
        if not found:
            raise UserError(f"no recurring run named '{name}' in experiment '{experiment}'")
        ids = [r.recurring_run_id for r in found]
    return _deleting(host, client, ids)


def _deleting(host: str, client, ids: list[str]) -> Iterator[str]:
    for rid in ids:
        _call(host, client.delete_recurring_run, rid)
        yield rid
