"""scripts/mlflow_screenshots.py on a small store shaped like `rlhf run`'s: a real `mlflow server`, real headless
Chromium (Debian's package), PNGs checked for size and content; its errors as one line and exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "mlflow_screenshots.py"
WIDTH, HEIGHT = 1600, 1000
STAGES = ("prepare-data", "sft", "reward", "ppo", "evaluate")
FIGURE_RGB = (255, 0, 255)  # a colour the MLflow UI never uses: found in a screenshot, it is the figure's


def chromium_or_skip() -> None:
    if shutil.which("chromium") is None:
        reason = "chromium not installed (bash scripts/setup.sh screenshots)"
        if os.environ.get("RLHF_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def make_store(root: Path, *, nested: bool = True) -> str:
    """What `rlhf run` leaves: experiment `rlhf-pipeline` with artifacts beside the database, a parent run named
    after the pipeline with one nested run per stage (tag `rlhf.stage`), PPO metrics over steps, a figure logged
    with `mlflow.log_figure`, and a registered policy version from the PPO run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("rlhf-pipeline", artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="rlhf-pipeline 20261201-150000")
    for stage in STAGES:
        tags = {"rlhf.stage": stage, **({"mlflow.parentRunId": parent.info.run_id} if nested else {})}
        run = client.create_run(exp, run_name=stage, tags=tags)
        run_id = run.info.run_id
        if stage == "ppo":
            for step in range(1, 9):
                client.log_metric(run_id, "ppo/reward_mean", 0.1 * step, step=step)
                client.log_metric(run_id, "ppo/approx_kl", 0.02 / step, step=step)
            model_dir = root / "policy"
            model_dir.mkdir()
            (model_dir / "config.json").write_text('{"model_type": "llama"}')
            client.log_artifacts(run_id, str(model_dir), "model")
            client.create_registered_model("rlhf-policy")
            client.create_model_version("rlhf-policy", f"{run.info.artifact_uri}/model", run_id=run_id)
        if stage == "evaluate":
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.bar(["sft", "ppo"], [0.4, 0.6], color=[c / 255 for c in FIGURE_RGB])
            client.log_figure(run_id, fig, "figures/reward_by_model.png")
            plt.close(fig)
        client.set_terminated(run_id)
    client.set_terminated(parent.info.run_id)
    return uri


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow_screenshots: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def figure_pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return sum(1 for pixel in image.convert("RGB").getdata() if pixel == FIGURE_RGB)


@pytest.mark.slow
def test_screenshots_of_a_pipeline_run(tmp_path):
    chromium_or_skip()
    from PIL import Image

    uri = make_store(tmp_path)
    result = run_script("--backend-store-uri", uri)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["01-runs", "02-ppo-charts", "03-figure", "04-registered-models", "05-model-version"]
    expected = [tmp_path / "screenshots" / f"{name}.png" for name in names]  # default: beside the store
    assert result.stdout.split() == [str(p) for p in expected]
    for path in expected:
        with Image.open(path) as image:
            image.verify()  # a complete, valid PNG
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
            # a blank page or a bare spinner has a handful of colours; a rendered UI page, text and icons, many
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 50, f"{path.name} looks blank"
    # the figure's own colour fills a good part of its preview, and appears in no other page
    assert figure_pixels(expected[2]) > 5000
    assert figure_pixels(expected[0]) == 0 and figure_pixels(expected[1]) == 0


@pytest.mark.slow
def test_a_store_without_nested_runs_is_refused(tmp_path):
    chromium_or_skip()
    uri = make_store(tmp_path, nested=False)
    line = one_error_line(run_script("--backend-store-uri", uri, "--out", str(tmp_path / "shots")))
    assert "no parent run with nested stage runs" in line
    assert not list((tmp_path / "shots").glob("*.png"))


def test_missing_chromium_is_one_line(tmp_path):
    line = one_error_line(run_script("--chromium", str(tmp_path / "no-such-chromium")))
    assert "chromium not found" in line


def test_missing_store_is_one_line(tmp_path):
    chromium_or_skip()
    line = one_error_line(run_script("--backend-store-uri", f"sqlite:///{tmp_path / 'absent.db'}"))
    assert f"no MLflow store at {tmp_path / 'absent.db'}" in line


def test_a_server_that_does_not_start_is_one_line(tmp_path):
    # a file that is not a SQLite database: `mlflow server` exits at start-up, before any browser is needed
    (tmp_path / "mlflow.db").write_bytes(b"not a database\n" * 100)
    chromium_or_skip()
    line = one_error_line(run_script("--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert "mlflow server exited with status" in line
