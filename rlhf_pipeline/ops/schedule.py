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
from pathlib import Path
from typing import Any

import click

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ops.kfp_client import api_error, connect, is_api_error, quiet_stdout


def normalize_cron(expr: str) -> str:
    """KFP's scheduler (robfig/cron) takes 6 fields, seconds first; accept the usual 5 and add "0"."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise UserError(f"--cron {expr!r}: expected 5 fields (min hour day month weekday) or 6 (seconds first)")
    return " ".join(fields)


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`k=v` -> run parameters. JSON values (numbers, booleans, objects, lists) are typed; anything else is
    a string. Quote a string that looks like JSON: --param 'tag="123"'."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--param {pair!r}: expected NAME=VALUE")
        try:
            params[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[name.strip()] = raw
    return params


def _experiment_id(client, name: str, namespace: str | None, create: bool) -> str | None:
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError as exc:
        if not str(exc).startswith("No experiment is found"):
            raise UserError(str(exc)) from None
    if not create:
        return None
    return client.create_experiment(name, namespace=namespace).experiment_id


def _latest_version_id(client, pipeline_id: str, pipeline_name: str) -> str:
    versions = client.list_pipeline_versions(pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc")
    if not versions.pipeline_versions:
        raise UserError(f"pipeline '{pipeline_name}' has no versions")
    return versions.pipeline_versions[0].pipeline_version_id


def _upload(client, package: Path, pipeline_name: str, version_name: str, namespace: str | None) -> tuple[str, str]:
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace)
        return pipeline.pipeline_id, _latest_version_id(client, pipeline.pipeline_id, pipeline_name)
    version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name,
                                             pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _by_name(client, experiment_id: str, name: str) -> list:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, filter=flt, page_size=100, page_token=token)
        found += [r for r in (page.recurring_runs or []) if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found


def create(client, *, name: str, cron: str, experiment: str, pipeline_name: str, version_id: str | None,
           package: Path | None, version_name: str | None, params: dict[str, Any], namespace: str | None,
           max_concurrency: int, catchup: bool, enabled: bool, service_account: str | None,
           replace: bool) -> dict[str, Any]:
    cron = normalize_cron(cron)
    if package is not None:
        pipeline_id, version_id = _upload(client, package, pipeline_name,
                                          version_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", namespace)
    else:
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            raise UserError(f"pipeline '{pipeline_name}' not found (upload it with --package or `rlhf submit`)")
        version_id = version_id or _latest_version_id(client, pipeline_id, pipeline_name)
    experiment_id = _experiment_id(client, experiment, namespace, create=True)
    previous = _by_name(client, experiment_id, name) if replace else []
    run = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron, params=params,
        pipeline_id=pipeline_id, version_id=version_id, max_concurrency=max_concurrency,
        no_catchup=not catchup, enabled=enabled, service_account=service_account,
        description=f"rlhf schedule: {pipeline_name} version {version_id}")
    for old in previous:
        client.delete_recurring_run(old.recurring_run_id)
    return {"recurring_run_id": run.recurring_run_id, "name": name, "cron": cron, "experiment_id": experiment_id,
            "pipeline_id": pipeline_id, "version_id": version_id, "parameters": params,
            "replaced": [old.recurring_run_id for old in previous]}


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
# CLI
# ----------------------------------------------------------------------------------------------------------

host_option = click.option("--host", envvar="KF_PIPELINES_ENDPOINT", required=True, show_envvar=True,
                           help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80.")
namespace_option = click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs).")
experiment_option = click.option("--experiment", default="rlhf-pipeline", show_default=True,
                                 help="Experiment the recurring runs belong to.")


@click.group("schedule", context_settings={"max_content_width": 110})
def command() -> None:
    """Create, list and delete recurring runs (token: $KF_PIPELINES_TOKEN, never a flag)."""


@command.command("create")
@host_option
@namespace_option
@experiment_option
@click.option("--name", required=True, help="Recurring run name (unique within the experiment with --replace).")
@click.option("--cron", required=True, help='Cron schedule, 5 fields ("0 3 * * 1") or KFP\'s 6 (seconds first).')
@click.option("--pipeline-name", default="rlhf-pipeline", show_default=True, help="Pipeline on the server.")
@click.option("--version-id", default=None, help="Pipeline version to run [default: the newest].")
@click.option("--package", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Upload this compiled pipeline as a new version first and schedule it.")
@click.option("--version-name", default=None, help="Name of the uploaded version [default: <name>-<time>].")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Run parameter (repeatable; JSON typed).")
@click.option("--max-concurrency", default=1, show_default=True, type=click.IntRange(1, 10),
              help="Runs of this schedule allowed at once.")
@click.option("--catchup/--no-catchup", default=False, show_default=True,
              help="Backfill every missed interval after a pause (retraining wants only the latest).")
@click.option("--disabled", is_flag=True, help="Create it paused.")
@click.option("--service-account", default=None, help="Kubernetes service account the runs use.")
@click.option("--replace/--no-replace", default=True, show_default=True,
              help="Delete older recurring runs with the same name after creating this one.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create_command(host: str, namespace: str | None, experiment: str, name: str, cron: str, pipeline_name: str,
                   version_id: str | None, package: Path | None, version_name: str | None, params: tuple[str, ...],
                   max_concurrency: int, catchup: bool, disabled: bool, service_account: str | None,
                   replace: bool, as_json: bool) -> int:
    """Create (or replace) a recurring run of a pipeline version."""
    if package is not None and version_id is not None:
        raise UserError("--package and --version-id are exclusive: the uploaded version is the one scheduled")
    normalize_cron(cron)  # bad input fails before any network call
    args = parse_params(params)
    client = connect(host, namespace)
    result = _call(host, create, client, name=name, cron=cron, experiment=experiment, pipeline_name=pipeline_name,
                   version_id=version_id, package=package, version_name=version_name, params=args,
                   namespace=namespace, max_concurrency=max_concurrency, catchup=catchup, enabled=not disabled,
                   service_account=service_account, replace=replace)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        replaced = f"; replaced {', '.join(result['replaced'])}" if result["replaced"] else ""
        click.echo(f"created recurring run {result['recurring_run_id']} '{name}' ({result['cron']}) of "
                   f"{pipeline_name} version {result['version_id']}{replaced}")
    return 0


@command.command("list")
@host_option
@namespace_option
@click.option("--experiment", default=None, help="Only this experiment's recurring runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def list_command(host: str, namespace: str | None, experiment: str | None, as_json: bool) -> int:
    """List recurring runs."""
    client = connect(host, namespace)
    experiment_id = None
    if experiment:
        experiment_id = _call(host, _experiment_id, client, experiment, namespace, create=False)
        if experiment_id is None:
            raise UserError(f"experiment '{experiment}' not found")
    rows, token = [], ""
    while True:
        page = _call(host, client.list_recurring_runs, experiment_id=experiment_id, namespace=namespace,
                     page_size=100, page_token=token)
        for r in page.recurring_runs or []:
            trigger = r.trigger
            cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
            version = r.pipeline_version_reference.pipeline_version_id if r.pipeline_version_reference else None
            rows.append({"recurring_run_id": r.recurring_run_id, "name": r.display_name, "cron": cron,
                         "mode": r.mode, "experiment_id": r.experiment_id, "version_id": version})
        token = page.next_page_token or ""
        if not token:
            break
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        click.echo("no recurring runs")
    else:
        for row in rows:
            click.echo(f"{row['recurring_run_id']}  {row['name']:<24} {row['cron'] or '-':<16} {row['mode']:<8} "
                       f"version {row['version_id']}")
    return 0


@command.command("delete")
@host_option
@namespace_option
@experiment_option
@click.option("--id", "run_id", default=None, help="Recurring run id.")
@click.option("--name", default=None, help="Delete every recurring run of this name in --experiment.")
def delete_command(host: str, namespace: str | None, experiment: str, run_id: str | None, name: str | None) -> int:
    """Delete a recurring run (by id, or all of one name in an experiment)."""
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
    for rid in ids:
        _call(host, client.delete_recurring_run, rid)
        click.echo(f"deleted recurring run {rid}")
    return 0
