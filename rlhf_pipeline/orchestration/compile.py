"""`rlhf compile`: the Kubeflow pipeline as YAML (IR spec + kubernetes platform spec), validated by the real KFP
compiler. Without options it rewrites the committed `pipelines/rlhf_pipeline.yaml` (default settings)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click
import yaml

from rlhf_pipeline.errors import UserError


def default_output() -> Path:
    from pipelines.rlhf_pipeline import COMPILED

    return COMPILED


def load_settings(settings_path: str | None, trainjob: bool = False):
    from rlhf_pipeline.orchestration.settings import PipelineSettings

    overrides: dict[str, Any] = {"distributed": "trainjob"} if trainjob else {}
    return PipelineSettings.load(settings_path, overrides)


def compile_to(output: str | Path, settings_path: str | None = None, trainjob: bool = False) -> Path:
    from pipelines.rlhf_pipeline import compile_pipeline

    settings = load_settings(settings_path, trainjob)
    out = Path(output)
    if out.is_dir():
        raise UserError(f"--output {out} is a directory; give a file name (e.g. {out}/rlhf_pipeline.yaml)")
    return compile_pipeline(out, settings)


def read_spec(path: str | Path) -> list[Any]:
    """The YAML documents of a compiled pipeline (comments, key order and formatting do not matter)."""
    try:
        return list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"compiled pipeline not found: {path}") from None


def is_stale(committed: str | Path, settings_path: str | None = None, trainjob: bool = False) -> bool:
    """True when compiling now gives a different spec than the committed file."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_to(Path(tmp) / "pipeline.yaml", settings_path, trainjob)
        return read_spec(fresh) != read_spec(committed)


def summary(path: Path) -> dict[str, Any]:
    docs = read_spec(path)
    spec = docs[0]
    tasks = []

    def walk(component: dict[str, Any]) -> None:
        for task in (component.get("dag") or {}).get("tasks", {}).values():
            ref = task["componentRef"]["name"]
            sub = spec["components"].get(ref, {})
            if "dag" in sub:
                walk(sub)
            else:
                tasks.append(task["taskInfo"]["name"])

    walk(spec["root"])
    from pipelines.rlhf_pipeline import DISPLAY

    order = list(DISPLAY.values())
    tasks.sort(key=lambda t: next((i for i, d in enumerate(order) if t.startswith(d)), len(order)))
    return {"tasks": tasks, "parameters": sorted(spec["root"].get("inputDefinitions", {}).get("parameters", {}))}


@click.command("compile", context_settings={"max_content_width": 110})
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Where to write the YAML [default: pipelines/rlhf_pipeline.yaml, the committed file].")
@click.option("--settings", "settings_path", type=click.Path(dir_okay=False), default=None,
              help="Kubernetes settings YAML (GPU node pool, resources, retries, caching, PVC, secrets, TrainJob); "
                   "see docs/pipeline.md.")
@click.option("--trainjob", is_flag=True, default=False,
              help="Training steps launch Kubeflow Trainer TrainJobs (same as settings `distributed: trainjob`).")
@click.option("--check", is_flag=True, default=False,
              help="Do not write: exit 1 if the output file differs from a fresh compile (CI staleness check).")
def command(output: str | None, settings_path: str | None, trainjob: bool, check: bool) -> int:
    """Compile the Kubeflow pipeline to YAML with the real KFP compiler."""
    out = Path(output) if output else default_output()
    if check:
        if is_stale(out, settings_path, trainjob):
            click.echo(f"{out} is stale: run `rlhf compile` and commit it", err=True)
            return 1
        click.echo(f"{out} is up to date")
        return 0
    path = compile_to(out, settings_path, trainjob)
    info = summary(path)
    mode = "TrainJob launchers" if trainjob or load_settings(settings_path).distributed == "trainjob" else "in-pod training"
    click.echo(f"wrote {path} ({len(info['tasks'])} tasks, {mode})")
    click.echo("tasks: " + ", ".join(dict.fromkeys(info["tasks"])))
    return 0
