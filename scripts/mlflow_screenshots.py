"""Screenshots of the MLflow UI for one pipeline run, reproducible from its tracking store.

    python scripts/mlflow_screenshots.py [--backend-store-uri sqlite:///outputs/mlflow.db]
        [--artifacts-destination outputs/mlartifacts] [--out outputs/screenshots]

Starts a real `mlflow server` on 127.0.0.1 (a free port) over the store `rlhf run` wrote, finds the runs through
MlflowClient (the latest parent run: no `mlflow.parentRunId` tag, nested stage runs under it, tagged `rlhf.pipeline`
or named after the pipeline; its PPO child: tag `rlhf.stage` = ppo), and photographs the UI with headless
Chromium (Debian's package; `bash scripts/setup.sh screenshots`):

    01-runs.png            the experiment's runs view, the parent row expanded to its nested stage runs
    02-ppo-charts.png      the PPO run's metric charts (Model metrics tab)
    03-figure.png          a logged figure: a PNG artifact previewed in its run's Artifacts tab
    04-registered-models.png  the registry's model list
    05-model-version.png   the pipeline run's registered version, a policy first (else the newest version)

Each shot waits for the content it is about (the nested rows, a drawn chart trace, the decoded image, the model
name), not for a fixed time. Prints the PNG paths; any failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headless_chromium import BrowserError, Page, find_chromium  # noqa: E402

WIDTH, HEIGHT = 1600, 1000
SERVER_START_S = 120.0
PIPELINE_NAME = "rlhf-pipeline"  # pipelines/rlhf_pipeline.py: the parent run is named after the pipeline
# The UI's "Model training" mode (runs, models, registry in the sidebar) rather than the GenAI pages
MODE = "workflowType=machine_learning"
# Runs most likely to hold the figures people look at first
FIGURE_RUN_ORDER = ("evaluate", "ppo", "dpo", "reward", "sft", "prepare-data")


class ScreenshotError(Exception):
    """A store, server or browser problem: one line for the user."""


@dataclass
class Targets:
    """What to photograph: ids found through MlflowClient."""

    experiment_id: str
    parent_id: str
    child_ids: list[str]
    charts_run_id: str
    figure_run_id: str
    figure_path: str
    model_name: str
    model_version: str


# --- the server ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_store(backend_store_uri: str) -> None:
    if backend_store_uri.startswith("sqlite:///"):
        db = Path(backend_store_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ScreenshotError(f"no MLflow store at {db} (run `rlhf run` first, or pass --backend-store-uri)")


def start_server(backend_store_uri: str, artifacts_destination: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1, answered on /health; the UI needs the server, not the store."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_destination)]
    cmd += ["--workers", "1"]
    # The server must read the store it was given, not one from the environment; no telemetry from the UI.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    log = open(log_path, "wb")  # noqa: SIM115 -- the server outlives this function; closed with it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            stop_server(proc)
            raise ScreenshotError(f"mlflow server exited with status {proc.returncode}: {last_error_line(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise ScreenshotError(f"mlflow server did not answer on {url}/health within {SERVER_START_S:.0f} s")
        time.sleep(0.5)


def last_error_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or ["no output"])[-1])[:300]


def stop_server(proc: subprocess.Popen) -> None:
    """The server's whole process group (it leads it: start_new_session), then its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


# --- what to photograph ---


def find_targets(url: str, experiment_name: str, pipeline_name: str) -> Targets:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ScreenshotError(f"no experiment {experiment_name!r} in the store (it has: {names})")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
    children: dict[str, list] = {}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(run)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_id in children]
    # `rlhf run` tags its parent run with the pipeline's name and names it `<pipeline> <run id>`
    named = [
        r
        for r in parents
        if r.data.tags.get("rlhf.pipeline") == pipeline_name or (r.info.run_name or "").startswith(pipeline_name)
    ]
    if not (named or parents):
        raise ScreenshotError(
            f"experiment {experiment_name!r} has no parent run with nested stage runs (a store from before nested runs?)"
        )
    parent = (named or parents)[0]  # newest first
    stages = children[parent.info.run_id]
    by_stage = {r.data.tags.get("rlhf.stage") or r.info.run_name: r for r in reversed(stages)}
    charts = by_stage.get("ppo") or by_stage.get("dpo")
    if charts is None:
        raise ScreenshotError(f"parent run {parent.info.run_id} has no nested ppo (or dpo) stage run to chart")
    ordered = [by_stage[s] for s in FIGURE_RUN_ORDER if s in by_stage]
    ordered += [r for r in stages if r not in ordered] + [parent]
    figure = next(((r, p) for r in ordered if (p := first_png(client, r.info.run_id))), None)
    if figure is None:
        raise ScreenshotError(f"no PNG artifact (a logged figure) in parent run {parent.info.run_id} or its stages")
    model_name, model_version = pick_model_version(client, [parent, *stages])
    return Targets(
        experiment_id=experiment.experiment_id,
        parent_id=parent.info.run_id,
        child_ids=[r.info.run_id for r in stages],
        charts_run_id=charts.info.run_id,
        figure_run_id=figure[0].info.run_id,
        figure_path=figure[1],
        model_name=model_name,
        model_version=model_version,
    )


def find_targets_or_explain(url: str, experiment_name: str, pipeline_name: str) -> Targets:
    """find_targets, a failing MLflow call (a store the server cannot read, say) as one line."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        return find_targets(url, experiment_name, pipeline_name)
    except (MlflowException, requests.exceptions.RequestException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ScreenshotError(f"reading the runs through {url} failed: {first}") from None


def first_png(client, run_id: str, path: str | None = None, depth: int = 3) -> str | None:
    """The first `.png` artifact of a run, breadth first, not inside a model directory (weights, not figures)."""
    entries = client.list_artifacts(run_id, path)
    for entry in entries:
        if not entry.is_dir and entry.path.lower().endswith(".png"):
            return entry.path
    if depth == 0:
        return None
    for entry in entries:
        if entry.is_dir and Path(entry.path).name not in ("model", "merged", "adapter", "checkpoints"):
            found = first_png(client, run_id, entry.path, depth - 1)
            if found:
                return found
    return None


def pick_model_version(client, runs) -> tuple[str, str]:
    """The newest version registered by one of these runs, a policy first; else the newest version anywhere."""
    versions = []
    for run in runs:
        versions += client.search_model_versions(f"run_id = '{run.info.run_id}'")
    if not versions:
        versions = client.search_model_versions(max_results=200)
    if not versions:
        raise ScreenshotError("the store has no registered model version")
    best = max(versions, key=lambda v: (v.name.endswith("-policy"), v.creation_timestamp, int(v.version)))
    return best.name, str(best.version)


# --- the shots ---

# The MLflow Assistant side panel (it opens by itself and hides a third of the page) and the registry's one-time
# "new Model Registry UI" promotion dialog: closed whenever they show (the browser profile then remembers).
DISMISS_OVERLAYS = """[
  ...document.querySelectorAll('[data-component-id="mlflow.assistant.chat_panel.close"]'),
  ...document.querySelectorAll('[role=dialog] button[aria-label=Close]'),
].map(button => button.click()).length"""
BUSY = "document.querySelector('[role=progressbar], .du-bois-light-spin, [data-testid=spinner]')"


def run_row_link(run_id: str) -> str:
    return f"document.querySelector('a[href$=\"/runs/{run_id}\"]')"


def settle(page: Page) -> None:
    """Overlays closed, no spinner (for up to 30 s: a page with dozens of charts, a real PPO run's, may keep one
    spinning below the fold; the content each shot needs was awaited before), the pointer off the charts (no hover
    toolbars), a moment for drawing."""
    page.evaluate(DISMISS_OVERLAYS)
    try:
        page.wait_for(f"!{BUSY}", "the end of loading", timeout_s=30)
    except BrowserError:
        print("mlflow_screenshots: a spinner still shows after 30 s; taking the shot anyway", file=sys.stderr)
    page.send("Input.dispatchMouseEvent", type="mouseMoved", x=WIDTH - 5, y=HEIGHT - 5)
    time.sleep(1.5)
    page.evaluate(DISMISS_OVERLAYS)


def take_shots(page: Page, url: str, t: Targets, out: Path) -> list[Path]:
    shots = []
    exp = f"{url}/#/experiments/{t.experiment_id}"

    # 1. the runs view, the parent expanded: click its row's expander, then every child row must be there
    page.goto(f"{exp}/runs?{MODE}")
    expander = f"{run_row_link(t.parent_id)}?.closest('.ag-cell-value')?.querySelector('button')"
    nested = " && ".join(run_row_link(c) for c in t.child_ids)
    page.wait_for(expander, f"the parent run {t.parent_id} in the runs table")
    page.evaluate(f"({nested}) || {expander}.click()")  # the UI may remember an expanded row: no second click
    page.wait_for(nested, "the nested stage runs under the parent")
    settle(page)
    shots.append(page.screenshot(out / "01-runs.png"))

    # 2. the PPO run's metric charts: at least one plotted trace
    page.goto(f"{exp}/runs/{t.charts_run_id}/model-metrics?{MODE}")
    page.wait_for("document.querySelector('.js-plotly-plot .scatterlayer .trace')", "a metric chart")
    settle(page)
    shots.append(page.screenshot(out / "02-ppo-charts.png"))

    # 3. a logged figure: the preview is an <img> on a blob: URL once the artifact is fetched and decoded
    page.goto(f"{exp}/runs/{t.figure_run_id}/artifacts/{quote(t.figure_path)}?{MODE}")
    page.wait_for(
        "[...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)",
        f"the preview of {t.figure_path}",
    )
    settle(page)
    shots.append(page.screenshot(out / "03-figure.png"))

    # 4. the registered models list, then 5. the pipeline run's model version
    name = quote(t.model_name, safe="")
    page.goto(f"{url}/#/models?{MODE}")
    page.wait_for(f"document.querySelector('a[href*=\"/models/{name}\"]')", f"the registered model {t.model_name}")
    settle(page)
    shots.append(page.screenshot(out / "04-registered-models.png"))

    page.goto(f"{url}/#/models/{name}/versions/{t.model_version}?{MODE}")
    page.wait_for(
        f"document.body.innerText.includes('Version {t.model_version}') && "
        "document.body.innerText.includes('Source Run')",
        f"version {t.model_version} of {t.model_name}",
    )
    settle(page)
    shots.append(page.screenshot(out / "05-model-version.png"))
    return shots


# --- the command ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///outputs/mlflow.db", help="the store `rlhf run` wrote")
    parser.add_argument(
        "--artifacts-destination",
        type=Path,
        help="the server's artifact root (default: mlartifacts/ beside a SQLite store, as tracking.py puts it)",
    )
    parser.add_argument("--experiment", default="rlhf-pipeline", help="MLflow experiment name")
    parser.add_argument("--pipeline-name", default=PIPELINE_NAME, help="the parent run's name prefix")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: screenshots/ beside a SQLite store)")
    parser.add_argument("--chromium", help="the Chromium binary (default: chromium on PATH)")
    return parser.parse_args(argv)


def store_dir(backend_store_uri: str) -> Path:
    if backend_store_uri.startswith("sqlite:///"):
        return Path(backend_store_uri.removeprefix("sqlite:///")).resolve().parent
    return Path.cwd()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        chromium = find_chromium(args.chromium)
        check_store(args.backend_store_uri)
        root = store_dir(args.backend_store_uri)
        out = (args.out or root / "screenshots").resolve()
        out.mkdir(parents=True, exist_ok=True)
        artifacts = args.artifacts_destination or root / "mlartifacts"
        with tempfile.TemporaryDirectory(prefix="mlflow-screenshots-") as tmp:
            proc, url = start_server(args.backend_store_uri, artifacts, Path(tmp) / "server.log")
            try:
                targets = find_targets_or_explain(url, args.experiment, args.pipeline_name)
                with Page(chromium, WIDTH, HEIGHT) as page:
                    shots = take_shots(page, url, targets, out)
            finally:
                stop_server(proc)
    except (ScreenshotError, BrowserError) as exc:
        print(f"mlflow_screenshots: error: {exc}", file=sys.stderr)
        return 2
    for shot in shots:
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
