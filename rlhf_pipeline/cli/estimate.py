"""`rlhf estimate-memory`: the estimated peak GPU memory per phase of a recipe's stage
(modeling/memory_estimate.py), so a node pool is picked before any GPU hour is spent.

    rlhf estimate-memory recipes/llama-7b/*.yaml --architecture llama-2-7b --budget-gib 20

Exit status 1 when a stage's peak plus the CUDA context exceeds --budget-gib.
"""

from __future__ import annotations

from pathlib import Path

import click

from rlhf_pipeline.errors import UserError


def _architecture(name: str | None, model: str):
    from rlhf_pipeline.modeling.memory_estimate import PRESETS, Architecture

    for candidate in (name, model):
        if candidate is None:
            continue
        if candidate in PRESETS:
            return candidate, PRESETS[candidate]
        path = Path(candidate).expanduser()
        config_dir = path.parent if path.name == "config.json" else path
        if (config_dir / "config.json").is_file():
            from transformers import AutoConfig

            return str(config_dir), Architecture.from_hf_config(AutoConfig.from_pretrained(config_dir))
        if candidate is name:
            raise UserError(
                f"--architecture {name}: neither a preset ({', '.join(PRESETS)}) nor a model dir / config.json"
            )
    raise UserError(f"cannot read the architecture of {model!r} here: pass --architecture (a preset or a config.json)")


@click.command("estimate-memory", context_settings={"max_content_width": 110})
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--stage", default=None, help="The stage of every recipe [default: the recipe's file name, e.g. ppo].")
@click.option("--architecture", default=None, help="A preset (llama-2-7b, llama-3-8b, ...) or a config.json / dir.")
@click.option("--budget-gib", type=float, default=None, help="Fail (exit 1) when a stage needs more GPU memory.")
def estimate_memory_command(recipes, stage, architecture, budget_gib) -> None:
    """Estimated peak GPU memory per phase of each recipe's stage."""
    from rlhf_pipeline import stages
    from rlhf_pipeline.modeling import memory_estimate as me

    over = []
    for recipe in recipes:
        key = (stage or Path(recipe).stem).replace("-", "_")
        if key not in stages.STAGES:
            raise UserError(f"{recipe}: no stage {key!r} (pass --stage: {', '.join(stages.STAGES)})")
        try:
            cfg = stages.STAGES[key].config_class().load(recipe)
            workload = me.workload_from_config(key, cfg)
        except ValueError as exc:
            raise UserError(f"{recipe}: {exc}") from None
        arch_name, arch = _architecture(architecture, cfg.model)
        phases = me.estimate(arch, workload)
        click.echo(f"{recipe}: {key} on {arch_name}, {workload.quantization}, {workload.dtype} (GiB)")
        parts = list(dict.fromkeys(part for phase in phases for part in phase.parts))
        click.echo("  " + f"{'phase':<10}{'peak':>8}" + "".join(f"{p:>13}" for p in parts))
        for phase in phases:
            cells = "".join(f"{phase.parts.get(p, 0) / me.GIB:>13.2f}" for p in parts)
            click.echo(f"  {phase.name:<10}{phase.total_gib:>8.2f}{cells}")
        top = me.peak(phases)
        needed = top.total_gib + me.CUDA_CONTEXT_GIB
        verdict = ""
        if budget_gib is not None:
            verdict = f" <= {budget_gib:g} GiB: fits" if me.fits(phases, budget_gib) else f" > {budget_gib:g} GiB: OVER"
            if not me.fits(phases, budget_gib):
                over.append(recipe)
        click.echo(
            f"  peak {top.name} {top.total_gib:.2f} + CUDA context {me.CUDA_CONTEXT_GIB} = {needed:.2f} GiB{verdict}"
        )
    if over:
        click.echo(f"over the {budget_gib:g} GiB budget: {', '.join(over)}", err=True)
        raise SystemExit(1)
