"""`rlhf schedule` and `rlhf promote`: the flags of the operations commands (ops/schedule.py and ops/promote.py
do the work)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rlhf_pipeline.ops import promote, schedule

host_option = click.option(
    "--host",
    envvar="KF_PIPELINES_ENDPOINT",
    required=True,
    show_envvar=True,
    help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80.",
)
namespace_option = click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs).")
experiment_option = click.option(
    "--experiment", default="rlhf-pipeline", show_default=True, help="Experiment the recurring runs belong to."
)


@click.group("schedule", context_settings={"max_content_width": 110})
def schedule_command() -> None:
    """Create, list and delete recurring runs (token: $KF_PIPELINES_TOKEN, else $KFP_TOKEN, else the projected service-account token; never a flag)."""


@schedule_command.command("create")
@host_option
@namespace_option
@experiment_option
@click.option("--name", required=True, help="Recurring run name (unique within the experiment with --replace).")
@click.option("--cron", required=True, help='Cron schedule, 5 fields ("0 3 * * 1") or KFP\'s 6 (seconds first).')
@click.option("--pipeline-name", default="rlhf-pipeline", show_default=True, help="Pipeline on the server.")
@click.option("--version-id", default=None, help="Pipeline version to run [default: the newest].")
@click.option(
    "--package",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Upload this compiled pipeline as a new version first and schedule it.",
)
@click.option("--version-name", default=None, help="Name of the uploaded version [default: <name>-<time>].")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Run parameter (repeatable; JSON typed).")
@click.option(
    "--max-concurrency",
    default=1,
    show_default=True,
    type=click.IntRange(1, 10),
    help="Runs of this schedule allowed at once.",
)
@click.option(
    "--catchup/--no-catchup",
    default=False,
    show_default=True,
    help="Backfill every missed interval after a pause (retraining wants only the latest).",
)
@click.option("--disabled", is_flag=True, help="Create it paused.")
@click.option("--service-account", default=None, help="Kubernetes service account the runs use.")
@click.option(
    "--replace/--no-replace",
    default=True,
    show_default=True,
    help="Delete older recurring runs with the same name after creating this one.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def schedule_create_command(
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
    disabled: bool,
    service_account: str | None,
    replace: bool,
    as_json: bool,
) -> int:
    """Create (or replace) a recurring run of a pipeline version."""
    result = schedule.create(
        host=host,
        namespace=namespace,
        experiment=experiment,
        name=name,
        cron=cron,
        pipeline_name=pipeline_name,
        version_id=version_id,
        package=package,
        version_name=version_name,
        params=params,
        max_concurrency=max_concurrency,
        catchup=catchup,
        enabled=not disabled,
        service_account=service_account,
        replace=replace,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        replaced = f"; replaced {', '.join(result['replaced'])}" if result["replaced"] else ""
        click.echo(
            f"created recurring run {result['recurring_run_id']} '{name}' ({result['cron']}) of "
            f"{pipeline_name} version {result['version_id']}{replaced}"
        )
    return 0


@schedule_command.command("list")
@host_option
@namespace_option
@click.option("--experiment", default=None, help="Only this experiment's recurring runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def schedule_list_command(host: str, namespace: str | None, experiment: str | None, as_json: bool) -> int:
    """List recurring runs."""
    rows = schedule.list_recurring(host=host, namespace=namespace, experiment=experiment)
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
    elif not rows:
        click.echo("no recurring runs")
    else:
        for row in rows:
            click.echo(
                f"{row['recurring_run_id']}  {row['name']:<24} {row['cron'] or '-':<16} {row['mode']:<8} "
                f"version {row['version_id']}"
            )
    return 0


@schedule_command.command("delete")
@host_option
@namespace_option
@experiment_option
@click.option("--id", "run_id", default=None, help="Recurring run id.")
@click.option("--name", default=None, help="Delete every recurring run of this name in --experiment.")
def schedule_delete_command(
    host: str, namespace: str | None, experiment: str, run_id: str | None, name: str | None
) -> int:
    """Delete a recurring run (by id, or all of one name in an experiment)."""
    for deleted in schedule.delete(host=host, namespace=namespace, experiment=experiment, run_id=run_id, name=name):
        click.echo(f"deleted recurring run {deleted}")
    return 0


@click.command("promote", context_settings={"max_content_width": 110})
@click.option("--model-name", required=True, help="Registered model name (the aligned policy).")
@click.option(
    "--candidate", default="challenger", show_default=True, help="Version number, or an alias, of the version to gate."
)
@click.option(
    "--gates",
    "gates_path",
    type=click.Path(dir_okay=False),
    default=str(promote.DEFAULT_GATES),
    show_default="rlhf_pipeline/ops/default_gates.yaml",
    help="YAML file with the thresholds.",
)
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI]. Credentials only via "
    "$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD (or $MLFLOW_TRACKING_TOKEN).",
)
@click.option("--dry-run", is_flag=True, help="Evaluate the gates, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.option(
    "--break-lock", is_flag=True, help="Delete a promotion lock left by a killed process, then exit (promotes nothing)."
)
def promote_command(
    model_name: str,
    candidate: str,
    gates_path: str,
    tracking_uri: str | None,
    dry_run: bool,
    as_json: bool,
    break_lock: bool,
) -> int:
    """Gate a registered model version and move its 'champion' alias to it if every gate passes."""
    if break_lock:
        holder = promote.break_lock(model_name, tracking_uri)
        click.echo(
            f"removed promotion lock of '{model_name}' ({holder})"
            if holder
            else f"no promotion lock for '{model_name}'"
        )
        return 0
    summary = promote.promote(model_name, candidate, gates_path, tracking_uri, dry_run)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for line in promote.verdict_lines(summary):
            click.echo(line)
    return promote.EXIT_GATE_FAILED if summary["verdict"] == "rejected" else 0
