"""`rlhf run`: the whole Kubeflow pipeline on this machine through `kfp.local` (SubprocessRunner, no cluster).

Every step runs the same component code as on Kubeflow, each in its own Python process, with the sizes of
`recipes/smollm2/pipeline.yaml` by default (small: minutes on two CPU cores). Outputs land under `--output`
(default `./outputs`):

    mlflow.db, mlartifacts/   MLflow tracking + registry (SQLite)
    kfp/                      the kfp.local pipeline root (every step's artifacts)
    work/<run>/<step>/        full stage outputs (merged models, checkpoints); only the latest run is kept
    logs/<run>.log            everything the steps printed
    report.md, report.html    the final report of the latest run

MLflow: one parent run per `rlhf run` (`rlhf-pipeline <kfp run id>`, created before the first step, its id passed to
every step in `$RLHF_MLFLOW_PARENT_RUN_ID` with the store in `$MLFLOW_TRACKING_URI`), each step's run nested under it,
the report logged to it at the end, and its page in the MLflow UI printed.

This module drives kfp.local and sets up the steps' environment; the configuration is run_config.py, the
progress on the console run_console.py, the final summary run_summary.py, the flags cli/run.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rlhf_pipeline import tracking
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL
from rlhf_pipeline.orchestration.run_config import LocalRunConfig, validate_stage_options
from rlhf_pipeline.orchestration.run_console import StepTimer, captured_stdout, strip_ansi
from rlhf_pipeline.orchestration.run_summary import collect_summary


@contextmanager
def step_environment(cfg: LocalRunConfig, parent_run_id: str | None = None) -> Iterator[None]:
    """Environment of the step processes: no inherited MLflow run/experiment, this run's store and parent run,
    quiet libraries."""
    saved = dict(os.environ)
    for var in ("MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    for var, value in step_variables(cfg, parent_run_id).items():
        os.environ.setdefault(var, value)
    os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def step_variables(cfg: LocalRunConfig, parent_run_id: str | None = None) -> dict[str, str]:
    """What the steps' environment adds: quiet libraries, unbuffered output, the thread count, the MLflow parent
    run and its store (prepare-data has no tracking parameter: it reads them here) -- also passed into the
    containers of `--runner docker`, which inherit nothing from this process."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
        "PYTHONUNBUFFERED": "1",
    }
    if parent_run_id:
        env[tracking.PARENT_RUN_ENV] = parent_run_id
        env["MLFLOW_TRACKING_URI"] = cfg.tracking()
    if cfg.num_threads:
        env["OMP_NUM_THREADS"] = str(cfg.num_threads)
    return env


def pipeline_arguments(cfg: LocalRunConfig, work_root: Path) -> dict[str, Any]:
    from rlhf_pipeline.orchestration import steps

    def section(name: str) -> dict[str, Any]:
        values = dict(getattr(cfg, name))
        if cfg.num_threads and name != "prepare_data":
            try:
                if "num_threads" in steps.stage_config_class(name).model_fields:
                    values.setdefault("num_threads", cfg.num_threads)
            except ModuleNotFoundError:  # a stage this version lacks; not run unless it is the alignment
                pass
        return values

    return {
        "alignment": cfg.alignment,
        "input_data": str(cfg.input_path().resolve()),
        "base_model": cfg.model,
        "prepare_data_config": section("prepare_data"),
        "sft_config": section("sft"),
        "reward_config": section("reward"),
        "ppo_config": section("ppo"),
        "dpo_config": section("dpo"),
        "evaluate_config": section("evaluate"),
        "judge_config": section("judge"),
        "mlflow_tracking_uri": cfg.tracking(),
        "experiment_name": cfg.experiment_name,
        "registered_model_prefix": cfg.registered_model_prefix,
        "work_root": str(work_root),
        "report_samples": cfg.report_samples,
    }


def run_local(cfg: LocalRunConfig, *, verbose: bool = False, console=None) -> dict[str, Any]:
    """Run the pipeline through kfp.local; returns the summary (timings, metrics, versions, paths)."""
    from rich.console import Console

    console = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
    inp = cfg.input_path()
    if not inp.exists():
        raise UserError(f"input not found: {inp} (set --input or $RLHF_SHARED_DIR)")
    validate_stage_options(cfg)

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work_root = out / "work"
    pipeline_root = out / "kfp"
    log_path = out / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    timer = StepTimer(console, verbose)
    t0 = time.monotonic()

    console.print(f"[bold]rlhf run[/]: {cfg.alignment.upper()} pipeline on {inp} with {cfg.model}; log: {log_path}")
    remove_previous_runs(work_root, console)
    if cfg.model == EMBEDDED_MODEL:
        ensure_model_cache(console, timer)

    parent = start_parent_run(cfg, inp)
    try:
        failure = run_pipeline(cfg, work_root, pipeline_root, timer, log_path, verbose, console, parent.run_id)
    except BaseException:  # interrupted: the parent run must not stay RUNNING
        finish_parent_run(parent, latest_run_dir(work_root), succeeded=False)
        raise
    total = time.monotonic() - t0
    run_dir = latest_run_dir(work_root)
    if failure:
        finish_parent_run(parent, run_dir, succeeded=False)
        raise step_failure(failure, timer, log_path, console)

    if run_dir is not None:
        (run_dir / FINISHED_MARK).touch()
    summary = collect_summary(cfg, out, run_dir, pipeline_root, timer, total, log_path)
    report = [Path(summary[k]) for k in ("report_md", "report_html") if summary.get(k)]
    if (out / "frontier.png").is_file() and report:  # report.md embeds it
        report.append(out / "frontier.png")
    finish_parent_run(parent, run_dir, succeeded=True, artifacts=report)
    summary["mlflow_run_url"] = parent.ui_url()
    summary["mlflow_parent_run_id"] = parent.run_id
    return summary


def latest_run_dir(work_root: Path) -> Path | None:
    """This run's work dir (kfp.local names it after the run's id): the newest one."""
    runs = sorted((p for p in work_root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def start_parent_run(cfg: LocalRunConfig, inp: Path) -> tracking.PipelineRun:
    """The MLflow parent run of this pipeline run, named by time until kfp.local has given the run its id."""
    return tracking.start_pipeline_run(
        cfg.tracking(),
        cfg.experiment_name,
        f"{tracking.PIPELINE_NAME} {time.strftime('%Y-%m-%d %H:%M:%S')}",
        {"alignment": cfg.alignment, "model": cfg.model, "input": str(inp), "runner": cfg.runner},
    )


def finish_parent_run(
    parent: tracking.PipelineRun, run_dir: Path | None, *, succeeded: bool, artifacts: list[Path] = ()
) -> None:
    """Close the parent run, named `rlhf-pipeline <kfp run id>` (the work dir's name: what the stage runs and the
    registered versions carry as kfp_run_id)."""
    kfp_run_id = run_dir.name if run_dir is not None else None
    tracking.finish_pipeline_run(
        parent,
        succeeded=succeeded,
        run_name=tracking.pipeline_run_name(kfp_run_id) if kfp_run_id else None,
        tags={"rlhf.kfp_run_id": kfp_run_id} if kfp_run_id else None,
        artifacts=artifacts,
    )


FINISHED_MARK = ".finished"  # written into a run's work dir once the whole pipeline succeeded


def remove_previous_runs(work_root: Path, console) -> None:
    """Remove finished runs' stage outputs (merged models are ~0.5 GB each for SmolLM2; MLflow keeps the registered
    copies) but keep the newest UNFINISHED run (killed or failed): its checkpoints are the only copy of its work."""
    if not work_root.is_dir():
        return
    runs = sorted((p for p in work_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    unfinished = [p for p in runs if not (p / FINISHED_MARK).exists()]
    keep = unfinished[-1] if unfinished else None
    for old in runs:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        console.print(
            f"kept {keep}: the stage outputs and checkpoints of an unfinished run "
            "(a stage resumes from them with `rlhf <stage> --output <that dir>/<stage>`)"
        )


def ensure_model_cache(console, timer: StepTimer) -> None:
    """Convert the embedded GGUF once before the steps start, so no step pays for it (and it is timed apart)."""
    from rlhf_pipeline.modeling.loading import cache_root, ensure_embedded_model

    if not (cache_root() / "models" / EMBEDDED_MODEL / "config.json").is_file():
        console.print("[bold cyan]▶[/] converting the embedded SmolLM2 GGUF once into the model cache")
        t = time.monotonic()
        ensure_embedded_model()
        timer.durations["(model cache)"] = time.monotonic() - t


def run_pipeline(
    cfg: LocalRunConfig,
    work_root: Path,
    pipeline_root: Path,
    timer: StepTimer,
    log_path: Path,
    verbose: bool,
    console,
    parent_run_id: str | None = None,
) -> str | None:
    """The kfp.local run itself, its output teed into the log and the timer; the failure message, if any."""
    from kfp import local
    from rich.status import Status

    if cfg.runner == "docker":  # every step in its own image (orchestration/docker_runner.py)
        from rlhf_pipeline.orchestration.docker_runner import docker_runner

        runner = docker_runner(pipeline_root, cfg.input_path(), step_variables(cfg, parent_run_id), cfg.tracking())
    else:
        runner = nullcontext(local.SubprocessRunner(use_venv=False))
    from rlhf_pipeline.orchestration.stage_parameters import split_typed

    args = split_typed(pipeline_arguments(cfg, work_root))  # typed parameters (sft_max_steps...) from the sections
    with step_environment(cfg, parent_run_id), warnings.catch_warnings(), runner as kfp_runner:
        from pipelines.rlhf_pipeline import build_pipeline  # after the runner: it points at the local images

        pipeline = build_pipeline(None)
        warnings.simplefilter("ignore")
        local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        spinner = nullcontext(None) if verbose else Status("starting…", console=console)
        with spinner as status:
            timer.live = status
            try:
                with captured_stdout(log_path, timer, verbose):
                    pipeline(**args)
            except RuntimeError as exc:
                return strip_ansi(str(exc))
            finally:
                timer.live = None
    return None


def step_failure(failure: str, timer: StepTimer, log_path: Path, console) -> UserError:
    """One line naming the failed step (its last output lines go to the console first)."""
    failed = [t for t, s in timer.status.items() if s != "SUCCESS"]
    task = failed[-1] if failed else None
    tail = "\n".join(timer.output.get(task, [])[-25:]) if task else ""
    if tail:
        console.print(f"[red]last lines of {timer.label(task)}:[/]\n{tail}")
    what = f"step '{timer.label(task)}' failed" if task else failure.splitlines()[0]
    return UserError(f"{what}; full log: {log_path}", exit_code=1)
