"""`rlhf run`: the whole Kubeflow pipeline on this machine through `kfp.local` (SubprocessRunner, no cluster).

Every step runs the same component code as on Kubeflow, each in its own Python process, with the sizes of
`recipes/smollm2/pipeline.yaml` by default (small: minutes on two CPU cores). Outputs land under `--output`
(default `./outputs`):

    mlflow.db, mlartifacts/   MLflow tracking + registry (SQLite)
    kfp/                      the kfp.local pipeline root (every step's artifacts)
    work/<run>/<step>/        full stage outputs (merged models, checkpoints); only the latest run is kept
    logs/<run>.log            everything the steps printed
    report.md, report.html    the final report of the latest run
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, TextIO

import click
import yaml
from pydantic import Field

from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "recipes" / "smollm2" / "pipeline.yaml"
STAGE_SECTIONS = ("prepare_data", "sft", "reward", "ppo", "dpo", "evaluate")

# task name prefix (kfp names tasks after components) -> label shown in progress and the summary
TASK_LABELS = {
    "prepare-data": "prepare data", "sft": "SFT", "reward": "reward model", "ppo": "PPO", "dpo": "DPO",
    "evaluate": "evaluate", "report": "report", "unknown-alignment": "unknown alignment",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_FINISH = re.compile(r"Task '([^']+)' finished with status (\w+)")


def shared_beer_posts() -> Path:
    shared = Path(os.environ.get("RLHF_SHARED_DIR") or REPO.parent / "shared")
    return shared / "data" / "stackexchange" / "beer.stackexchange.com" / "Posts.xml"


class LocalRunConfig(StageConfig):
    alignment: Literal["ppo", "dpo"] = Field("ppo", description="Alignment step after the reward model: ppo or dpo.")
    model: str = Field(EMBEDDED_MODEL, description="Base model: HF id, local dir, or the embedded SmolLM2.")
    input: str | None = Field(None, description="Stack Exchange dump; default: the beer sample in $RLHF_SHARED_DIR "
                              "or ../shared.")
    output: str = Field("outputs", description="Output directory (MLflow SQLite store, artifacts, report).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<output>/mlflow.db.")
    experiment_name: str = Field("rlhf-pipeline", description="MLflow experiment.")
    registered_model_prefix: str = Field("rlhf", description="Registered models: <prefix>-sft, -reward, -policy.")
    report_samples: int = Field(4, ge=0, description="Sample generations in the report.")
    num_threads: int | None = Field(None, gt=0, description="torch threads per step (default: all cores).")
    prepare_data: dict[str, Any] = Field(default_factory=dict, description="prepare-data options.")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFT options.")
    reward: dict[str, Any] = Field(default_factory=dict, description="Reward-model options.")
    ppo: dict[str, Any] = Field(default_factory=dict, description="PPO options.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="DPO options.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="Evaluation options.")

    def input_path(self) -> Path:
        return Path(self.input).expanduser() if self.input else shared_beer_posts()

    def tracking(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.output).resolve() / 'mlflow.db'}"


def load_config(recipe: str | None, overrides: dict[str, Any], sets: tuple[str, ...] = ()) -> LocalRunConfig:
    """The default recipe (recipes/smollm2/pipeline.yaml, the only source of the small sizes) < `recipe` < flags
    < --set section.key=value."""
    from rlhf_pipeline.config import read_recipe

    data: dict[str, Any] = read_recipe(DEFAULT_RECIPE)
    source = str(DEFAULT_RECIPE)
    if recipe is not None and Path(recipe).resolve() != DEFAULT_RECIPE.resolve():
        source = recipe
        for key, value in read_recipe(recipe).items():
            if key in STAGE_SECTIONS and isinstance(value, dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
    data.update({k: v for k, v in overrides.items() if v is not None})
    _without_native_bf16(data)
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. sft.max_steps=10")
        path, raw = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in STAGE_SECTIONS:
            raise UserError(f"--set {item!r}: section must be one of {', '.join(STAGE_SECTIONS)}")
        data.setdefault(section, {})[key] = yaml.safe_load(raw) if raw.strip() else ""
    try:
        return LocalRunConfig.model_validate(data)
    except Exception as exc:  # pydantic ValidationError -> the shared one-line format
        from pydantic import ValidationError

        from rlhf_pipeline.config import format_validation_error

        if isinstance(exc, ValidationError):
            raise UserError(format_validation_error(exc, overrides, source)) from None
        raise


def _without_native_bf16(data: dict[str, Any]) -> None:
    """bf16 weights/autocast are 1.5-2x faster than fp32 on CPUs with AVX512_BF16/AMX (and on GPUs) but several
    times SLOWER where bf16 is emulated: there the stages fall back to fp32 (said once, on stderr)."""
    from rlhf_pipeline.modeling.loading import native_bf16_available

    if native_bf16_available():
        return
    changed = []
    for section in STAGE_SECTIONS:
        values = data.get(section)
        if isinstance(values, dict) and (values.get("precision") == "bf16" or values.get("mixed_precision") == "bf16"):
            values.update(precision="fp32", mixed_precision="no")
            changed.append(section)
    if changed:
        print(f"rlhf run: no native bf16 on this machine: {', '.join(changed)} run in fp32", file=sys.stderr)


def validate_stage_options(cfg: LocalRunConfig) -> None:
    """Build every stage's config from its section before anything runs, so a typo fails in a second, not after
    the first steps trained for minutes. Paths are placeholders; the pipeline wires the real ones."""
    from rlhf_pipeline.orchestration import steps

    placeholders = {"data": "/placeholder/data", "output": "/placeholder/out", "input": str(cfg.input_path()),
                    "model": cfg.model, "reward_model": "/placeholder/reward"}
    needed = ["prepare_data", "sft", "reward", cfg.alignment, "evaluate"]
    for section in needed:
        values = dict(getattr(cfg, section))
        if None in values.values():
            nulls = [k for k, v in values.items() if v is None]
            raise UserError(f"{section}: null values are not supported ({', '.join(nulls)}); leave the key out")
        try:
            config_cls = steps.stage_config_class(section)
        except ModuleNotFoundError as exc:
            raise UserError(f"stage '{section}' is not available in this version ({exc.name})") from None
        unknown = sorted(set(values) - set(config_cls.model_fields))
        if unknown:
            raise UserError(f"unknown option {', '.join(f'{section}.{k}' for k in unknown)} "
                            f"(see `rlhf {section.replace('_', '-')} --help`)")
        try:
            steps.build_config(config_cls, values, **placeholders)
        except UserError as exc:
            raise UserError(f"{section}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Progress: kfp.local prints task start/finish lines and the steps' output to stdout; we tee it into the log,
# turn the start/finish lines into rich progress, and echo everything only with --verbose.
# ---------------------------------------------------------------------------------------------------------------


class StepTimer:
    def __init__(self, console, verbose: bool):
        self.console = console
        self.verbose = verbose
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds (user + system) of the step's processes
        self._cpu0: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.output: dict[str, list[str]] = {}
        self.current: str | None = None
        self.live = None

    @staticmethod
    def label(task: str) -> str:
        base = re.sub(r"-\d+$", "", task)
        return TASK_LABELS.get(base, task)

    def line(self, text: str) -> None:
        clean = _ANSI.sub("", text)
        if m := _START.search(clean):
            self.current = m.group(1)
            self.started[self.current] = time.monotonic()
            self._cpu0[self.current] = children_cpu()
            self.output[self.current] = []
            self.console.print(f"[bold cyan]▶[/] {self.label(self.current)} started")
            if self.live is not None:
                self.live.update(f"{self.label(self.current)} running…")
            return
        if m := _FINISH.search(clean):
            task, status = m.group(1), m.group(2)
            took = time.monotonic() - self.started.get(task, time.monotonic())
            self.durations[task] = took
            self.cpu[task] = children_cpu() - self._cpu0.get(task, children_cpu())
            self.status[task] = status
            ok = status == "SUCCESS"
            mark = "[bold green]✓[/]" if ok else "[bold red]✗[/]"
            self.console.print(f"{mark} {self.label(task)} {'finished' if ok else 'FAILED'} in {fmt_seconds(took)}")
            self.current = None
            if self.live is not None:
                self.live.update("waiting for the next step…")
            return
        if self.current is not None:
            buf = self.output.setdefault(self.current, [])
            buf.append(clean)
            del buf[:-200]


class _Tee(io.TextIOBase):
    """sys.stdout replacement: everything to the log file, lines to the StepTimer, optionally to the terminal."""

    def __init__(self, log: TextIO, timer: StepTimer, echo: TextIO | None):
        self.log, self.timer, self.echo = log, timer, echo
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        if self.echo is not None:
            self.echo.write(s)
        self._partial += s
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self.timer.line(line)
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False


@contextmanager
def captured_stdout(log_path: Path, timer: StepTimer, verbose: bool) -> Iterator[None]:
    real = sys.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        sys.stdout = _Tee(log, timer, real if verbose else None)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout = real


def children_cpu() -> float:
    """CPU seconds of finished child processes (kfp.local waits for each step's process before reporting it)."""
    t = os.times()
    return t.children_user + t.children_system


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


@contextmanager
def step_environment(cfg: LocalRunConfig) -> Iterator[None]:
    """Environment of the step processes: no inherited MLflow run/experiment, quiet libraries."""
    saved = dict(os.environ)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ["PYTHONUNBUFFERED"] = "1"
    if cfg.num_threads:
        os.environ["OMP_NUM_THREADS"] = str(cfg.num_threads)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


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
        "alignment": cfg.alignment, "input_data": str(cfg.input_path().resolve()), "base_model": cfg.model,
        "prepare_data_config": section("prepare_data"), "sft_config": section("sft"),
        "reward_config": section("reward"), "ppo_config": section("ppo"), "dpo_config": section("dpo"),
        "evaluate_config": section("evaluate"), "mlflow_tracking_uri": cfg.tracking(),
        "experiment_name": cfg.experiment_name, "registered_model_prefix": cfg.registered_model_prefix,
        "work_root": str(work_root), "report_samples": cfg.report_samples,
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
    before = set(p.name for p in work_root.iterdir()) if work_root.is_dir() else set()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = out / "logs" / f"run-{stamp}.log"
    timer = StepTimer(console, verbose)
    t0 = time.monotonic()

    console.print(f"[bold]rlhf run[/]: {cfg.alignment.upper()} pipeline on {inp} with {cfg.model}; "
                  f"log: {log_path}")

    # Keep one run's stage outputs: merged models are ~0.5 GB each for SmolLM2 (MLflow keeps registered copies).
    for old in before:
        shutil.rmtree(work_root / old, ignore_errors=True)
    before = set()

    if cfg.model == EMBEDDED_MODEL:
        from rlhf_pipeline.modeling.loading import cache_root, ensure_embedded_model

        if not (cache_root() / "models" / EMBEDDED_MODEL / "config.json").is_file():
            console.print("[bold cyan]▶[/] converting the embedded SmolLM2 GGUF once into the model cache")
            t = time.monotonic()
            ensure_embedded_model()
            timer.durations["(model cache)"] = time.monotonic() - t

    from kfp import local

    from pipelines.rlhf_pipeline import build_pipeline

    pipeline = build_pipeline(None)
    args = pipeline_arguments(cfg, work_root)
    failure: str | None = None
    with step_environment(cfg), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   raise_on_error=True)
        from contextlib import nullcontext

        from rich.status import Status

        spinner = nullcontext(None) if verbose else Status("starting…", console=console)
        with spinner as status:
            timer.live = status
            try:
                with captured_stdout(log_path, timer, verbose):
                    pipeline(**args)
            except RuntimeError as exc:
                failure = _ANSI.sub("", str(exc))
            finally:
                timer.live = None
    total = time.monotonic() - t0

    if failure:
        failed = [t for t, s in timer.status.items() if s != "SUCCESS"]
        task = failed[-1] if failed else None
        tail = "\n".join(timer.output.get(task, [])[-25:]) if task else ""
        if tail:
            console.print(f"[red]last lines of {timer.label(task)}:[/]\n{tail}")
        what = f"step '{timer.label(task)}' failed" if task else failure.splitlines()[0]
        raise UserError(f"{what}; full log: {log_path}", exit_code=1)

    new_runs = sorted((p for p in work_root.iterdir() if p.name not in before), key=lambda p: p.stat().st_mtime)
    run_dir = new_runs[-1] if new_runs else None
    summary = collect_summary(cfg, out, run_dir, pipeline_root, timer, total, log_path)
    return summary


def _latest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def collect_summary(cfg: LocalRunConfig, out: Path, run_dir: Path | None, pipeline_root: Path, timer: StepTimer,
                    total: float, log_path: Path) -> dict[str, Any]:
    from rlhf_pipeline.orchestration import steps

    metrics: dict[str, dict[str, Any]] = {}
    if run_dir is not None:
        for step in ("sft", "reward", cfg.alignment, "evaluate"):
            raw = steps.read_metrics(run_dir / step)
            metrics[step] = steps.namespaced(step, steps.flat_metrics(raw))
    report_md = _latest("*/report*/report_md", pipeline_root)
    report_html = _latest("*/report*/report_html", pipeline_root)
    paths = {}
    if report_md is not None:
        shutil.copy2(report_md, out / "report.md")
        paths["report_md"] = str(out / "report.md")
    if report_html is not None:
        shutil.copy2(report_html, out / "report.html")
        paths["report_html"] = str(out / "report.html")
    versions = registered_versions(cfg, run_dir.name if run_dir else None)
    timings = {timer.label(t): round(d, 1) for t, d in timer.durations.items()}
    cpu = {timer.label(t): round(c, 1) for t, c in timer.cpu.items()}
    return {
        "alignment": cfg.alignment, "run": run_dir.name if run_dir else None, "total_seconds": round(total, 1),
        "step_seconds": timings, "step_cpu_seconds": cpu, "metrics": metrics, "registered": versions, "tracking_uri": cfg.tracking(),
        "work_dir": str(run_dir) if run_dir else None, "log": str(log_path), **paths,
    }


def registered_versions(cfg: LocalRunConfig, run_key: str | None) -> list[dict[str, Any]]:
    if not run_key:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking())
    rows = []
    for stage in ("sft", "reward", "policy"):
        name = f"{cfg.registered_model_prefix}-{stage}"
        try:
            found = client.search_model_versions(f"name = '{name}' and tags.kfp_run_id = '{run_key}'")
        except Exception:  # noqa: BLE001 (a missing model is just not listed)
            found = []
        for mv in sorted(found, key=lambda v: int(v.version)):
            mv = client.get_model_version(mv.name, mv.version)  # search results carry no aliases
            rows.append({"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []),
                         "tags": dict(mv.tags or {})})
    return rows


HEADLINE = [("RM accuracy", "reward", "rm/accuracy"), ("eval reward (policy)", "evaluate", "eval/reward_mean"),
            ("eval KL (policy‖SFT)", "evaluate", "eval/kl"), ("eval win-rate vs SFT", "evaluate", "eval/win_rate")]


def print_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title="Step times", show_header=True)
    t.add_column("step")
    t.add_column("wall s", justify="right")
    t.add_column("CPU s", justify="right")
    cpu = summary.get("step_cpu_seconds", {})
    for step, secs in summary["step_seconds"].items():
        t.add_row(step, f"{secs:.1f}", f"{cpu[step]:.1f}" if step in cpu else "")
    t.add_row("[bold]total[/]", f"[bold]{summary['total_seconds']:.1f}[/]", f"{sum(cpu.values()):.1f}")
    console.print(t)

    m = summary["metrics"]
    t = Table(title="Results", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for label, step, key in HEADLINE:
        value = m.get(step, {}).get(key)
        t.add_row(label, f"{value:.4g}" if isinstance(value, float) else "n/a")
    align = summary["alignment"]
    for key, value in sorted(m.get(align, {}).items()):
        if any(w in key for w in ("reward", "kl", "loss", "accuracy", "margin")):
            t.add_row(key, f"{value:.4g}")
    console.print(t)

    if summary["registered"]:
        t = Table(title="Registered model versions (MLflow)", show_header=True)
        for col in ("model", "version", "aliases", "lineage"):
            t.add_column(col)
        for v in summary["registered"]:
            lineage = " ".join(f"{k}={str(v['tags'][k])[:10]}" for k in ("data_hash", "git_commit", "config_hash")
                               if k in v["tags"])
            t.add_row(v["name"], v["version"], ",".join(v["aliases"]), lineage)
        console.print(t)
    uri = summary["tracking_uri"]
    console.print(f"MLflow UI:  [bold]mlflow ui --backend-store-uri {uri}[/]")
    if summary.get("report_md"):
        console.print(f"Report:     {summary['report_md']}  ({summary.get('report_html', '')})")
    console.print(f"Outputs:    {summary['work_dir']}")
    console.print(f"Log:        {summary['log']}")


@click.command("run", context_settings={"max_content_width": 110})
@click.option("--config", "-c", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Pipeline recipe YAML [default: recipes/smollm2/pipeline.yaml when present, else built-in small sizes].")
@click.option("--alignment", type=click.Choice(["ppo", "dpo"]), default=None, help="ppo (default) or dpo.")
@click.option("--model", default=None, help=f"Base model [default: {EMBEDDED_MODEL}].")
@click.option("--input", "input_", default=None, help="Stack Exchange dump [default: the shared beer sample].")
@click.option("--output", "-o", default=None, help="Output directory [default: ./outputs].")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: sqlite:///<output>/mlflow.db].")
@click.option("--experiment-name", default=None, help="MLflow experiment [default: rlhf-pipeline].")
@click.option("--num-threads", type=int, default=None, help="torch threads per step [default: all cores].")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one stage option (repeatable), e.g. --set sft.max_steps=10 --set ppo.steps=3.")
@click.option("--verbose", "-v", is_flag=True, default=False, help="Stream every step's output, not only progress.")
@click.option("--print-config", is_flag=True, default=False, help="Print the resolved configuration and exit.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the summary as JSON at the end.")
def command(recipe: str | None, alignment: str | None, model: str | None, input_: str | None, output: str | None,
            tracking_uri: str | None, experiment_name: str | None, num_threads: int | None, sets: tuple[str, ...],
            verbose: bool, print_config: bool, as_json: bool) -> int:
    """Run the whole pipeline locally through kfp.local (the embedded SmolLM2 on the beer sample by default)."""
    from rich.console import Console

    if recipe is None and DEFAULT_RECIPE.is_file():
        recipe = str(DEFAULT_RECIPE)
    cfg = load_config(recipe, {"alignment": alignment, "model": model, "input": input_, "output": output,
                               "tracking_uri": tracking_uri, "experiment_name": experiment_name,
                               "num_threads": num_threads}, sets)
    if print_config:
        click.echo(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False))
        return 0
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    summary = run_local(cfg, verbose=verbose, console=console)
    print_summary(summary, console)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    return 0
