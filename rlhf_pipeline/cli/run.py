"""`rlhf run`: the flags of the local pipeline run (orchestration/local_run.py does the run)."""

from __future__ import annotations

import json
import sys

import click
import yaml

from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL


@click.command("run", context_settings={"max_content_width": 110})
@click.option(
    "--config",
    "-c",
    "recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="Pipeline recipe YAML [default: recipes/smollm2/pipeline.yaml when present, else built-in small sizes].",
)
@click.option(
    "--alignment",
    type=click.Choice(["ppo", "dpo", "both"]),
    default=None,
    help="ppo (default), dpo, or both (side by side).",
)
@click.option("--model", default=None, help=f"Base model [default: {EMBEDDED_MODEL}].")
@click.option("--input", "input_", default=None, help="Stack Exchange dump [default: the shared beer sample].")
@click.option("--output", "-o", default=None, help="Output directory [default: ./outputs].")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: sqlite:///<output>/mlflow.db].")
@click.option("--experiment-name", default=None, help="MLflow experiment [default: rlhf-pipeline].")
@click.option(
    "--runner",
    type=click.Choice(["subprocess", "docker"]),
    default=None,
    help="subprocess (default): each step a Python process; docker: each step in its own image "
    "(build them first: images/build.sh local).",
)
@click.option("--num-threads", type=int, default=None, help="torch threads per step [default: all cores].")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one stage option (repeatable), e.g. --set sft.max_steps=10 --set ppo.steps=3.",
)
@click.option("--verbose", "-v", is_flag=True, default=False, help="Stream every step's output, not only progress.")
@click.option("--print-config", is_flag=True, default=False, help="Print the resolved configuration and exit.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the summary as JSON at the end.")
def run_command(
    recipe: str | None,
    alignment: str | None,
    model: str | None,
    input_: str | None,
    output: str | None,
    tracking_uri: str | None,
    experiment_name: str | None,
    num_threads: int | None,
    runner: str | None,
    sets: tuple[str, ...],
    verbose: bool,
    print_config: bool,
    as_json: bool,
) -> int:
    """Run the whole pipeline locally through kfp.local (the embedded SmolLM2 on the beer sample by default)."""
    from rich.console import Console

    from rlhf_pipeline.orchestration.local_run import run_local
    from rlhf_pipeline.orchestration.run_config import load_config
    from rlhf_pipeline.orchestration.run_summary import print_summary

    cfg = load_config(
        recipe,
        {
            "alignment": alignment,
            "model": model,
            "input": input_,
            "output": output,
            "tracking_uri": tracking_uri,
            "experiment_name": experiment_name,
            "num_threads": num_threads,
            "runner": runner,
        },
        sets,
    )
    if print_config:
        from rlhf_pipeline.orchestration.run_config import validate_stage_options

        validate_stage_options(cfg)  # what is printed is what a run would accept
        click.echo(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False))
        return 0
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    summary = run_local(cfg, verbose=verbose, console=console)
    summary["gates"] = challenger_gates(cfg, summary)
    print_summary(summary, console)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    return 0


def challenger_gates(cfg, summary: dict) -> dict | None:
    """The promotion gates' verdict (`rlhf promote` with the default gates, nothing changed) on the version the
    run pointed `challenger` at; None when the run registered none."""
    from rlhf_pipeline import tracking
    from rlhf_pipeline.ops.gates import verdict

    found = [v for v in summary.get("registered", []) if "challenger" in v.get("aliases", [])]
    if not found:
        return None
    return verdict(tracking.client(cfg.tracking()), found[-1]["name"], found[-1]["version"])
