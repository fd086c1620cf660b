"""`rlhf compile` and `rlhf submit`: the flags of the Kubeflow pipeline commands (orchestration/compile.py and
orchestration/submit.py do the work)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compile", context_settings={"max_content_width": 110})
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the YAML [default: pipelines/rlhf_pipeline.yaml, the committed file].",
)
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Kubernetes settings YAML (GPU node pool, resources, retries, caching, PVC, secrets, TrainJob); "
    "see docs/pipeline.md.",
)
@click.option(
    "--trainjob",
    is_flag=True,
    default=False,
    help="Training steps launch Kubeflow Trainer TrainJobs (same as settings `distributed: trainjob`).",
)
@click.option(
    "--registry",
    default=None,
    metavar="HOST[:PORT][/PATH]",
    help="Registry the step images are pulled from: every image becomes REGISTRY/rlhf-<step>:TAG "
    "[default: images.yaml's].",
)
@click.option("--tag", default=None, help="Image tag of every step [default: images.yaml's].")
@click.option(
    "--images-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="images.yaml to read names, registry, tag and digests from [default: $RLHF_IMAGES_FILE, else "
    "images/images.yaml]; a digest is kept where --registry/--tag do not change its image.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Default of a run parameter in the compiled YAML (repeatable, wins over --params-file), e.g. "
    "--param ppo_steps=50; checked like `rlhf submit --param`.",
)
@click.option(
    "--params-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="YAML/JSON mapping of run parameter defaults; every stage's options are checked before anything is written.",
)
@click.option(
    "--check",
    is_flag=True,
    default=False,
    help="Do not write: exit 1 if the output file differs from a fresh compile (CI staleness check).",
)
def compile_command(
    output: str | None,
    settings_path: str | None,
    trainjob: bool,
    registry: str | None,
    tag: str | None,
    images_file: str | None,
    params: tuple[str, ...],
    params_file: str | None,
    check: bool,
) -> int:
    """Compile the Kubeflow pipeline to YAML with the real KFP compiler."""
    from rlhf_pipeline.orchestration.compile import compile_to, default_output, is_stale, summary, uses_trainjob

    out = Path(output) if output else default_output()
    options = {
        "registry": registry,
        "tag": tag,
        "images_file": images_file,
        "params": params,
        "params_file": params_file,
    }
    if check:
        if is_stale(out, settings_path, trainjob, **options):
            click.echo(f"{out} is stale: run `rlhf compile` and commit it", err=True)
            return 1
        click.echo(f"{out} is up to date")
        return 0
    path = compile_to(out, settings_path, trainjob, **options)
    info = summary(path)
    mode = "TrainJob launchers" if uses_trainjob(settings_path, trainjob) else "in-pod training"
    click.echo(f"wrote {path} ({len(info['tasks'])} tasks, {mode})")
    click.echo("tasks: " + ", ".join(dict.fromkeys(info["tasks"])))
    click.echo("images: " + ", ".join(info["images"]))
    return 0


@click.command("submit", context_settings={"max_content_width": 110})
@click.option(
    "--host",
    required=True,
    help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080 (token: $KF_PIPELINES_TOKEN, else $KFP_TOKEN, else the projected service-account token).",
)
@click.option("--experiment", default="rlhf-pipeline", show_default=True, help="Experiment of the run.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Pipeline argument (repeatable, wins over --params-file); JSON for objects/lists/numbers, e.g. "
    "--param alignment=dpo --param sft_max_steps=500 --param 'sft_config={\"lora_r\": 16}'.",
)
@click.option(
    "--params-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="YAML/JSON mapping of pipeline arguments. Every stage's options are checked before anything is uploaded.",
)
@click.option(
    "--package",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Compiled pipeline YAML to upload [default: compile now with --settings].",
)
@click.option(
    "--settings",
    "settings_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Kubernetes settings YAML for the compile (see `rlhf compile`).",
)
@click.option("--trainjob", is_flag=True, default=False, help="Compile with TrainJob training steps.")
@click.option("--pipeline-name", default="rlhf-pipeline", show_default=True, help="Pipeline name on the server.")
@click.option("--version-name", default=None, help="Pipeline version name [default: <git commit>-<time>].")
@click.option("--run-name", default=None, help="Run name [default: rlhf-<alignment>-<time>].")
@click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs).")
def submit_command(
    host: str,
    experiment: str,
    params: tuple[str, ...],
    params_file: str | None,
    package: str | None,
    settings_path: str | None,
    trainjob: bool,
    pipeline_name: str,
    version_name: str | None,
    run_name: str | None,
    namespace: str | None,
) -> int:
    """Upload the pipeline (or a new version of it) to Kubeflow and start a run."""
    from rlhf_pipeline.orchestration.submit import submit_pipeline

    result = submit_pipeline(
        host=host,
        params=params,
        params_file=params_file,
        package=package,
        settings_path=settings_path,
        trainjob=trainjob,
        pipeline_name=pipeline_name,
        version_name=version_name,
        run_name=run_name,
        experiment=experiment,
        namespace=namespace,
    )
    click.echo(
        f"uploaded {result['uploaded']} ({pipeline_name}, version {result['version_id']}); "
        f"started run {result['run_id']} in experiment {experiment!r}"
    )
    click.echo(result["run_url"])
    return 0
