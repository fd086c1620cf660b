"""Shared fixtures: tiny random-init models with the SmolLM2 tokenizer, isolated caches, the shared data dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHF_SHARED_DIR") or REPO.parent / "shared")
BEER_POSTS = SHARED / "data" / "stackexchange" / "beer.stackexchange.com" / "Posts.xml"


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test leaves os.environ as it found it: code under test sets variables (MLflow's HTTP bounds, a
    tracking URI for the steps) that would otherwise reach every later test, and make its result depend on order."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def beer_posts() -> Path:
    if not BEER_POSTS.is_file():
        pytest.fail(f"the Stack Exchange sample is missing: {BEER_POSTS} (set RLHF_SHARED_DIR)")
    return BEER_POSTS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~3M-parameter Llama with the real SmolLM2 tokenizer (pad == eos), built once per session."""
    from rlhf_pipeline.modeling.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test; the env vars Kubeflow would inject are cleared."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def unused_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and rendezvous the test starts)."""
    return free_port()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real MLflow tracking server (SQLite backend, local artifacts), killed at teardown."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--artifacts-destination",
        str(tmp / "artifacts"),
        "--workers",
        "1",
    ]
    log = open(tmp / "server.log", "wb")
    # Own session: the server spawns workers; teardown signals the whole group it leads (ours only).
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""}
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not become healthy in 120 s")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
