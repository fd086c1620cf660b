"""kfp.local's DockerRunner through podman (orchestration/docker_runner.py), on the images of images/build.sh local:
a component's output comes back through the bind-mounted pipeline root, and a component that fails makes the
task fail with its log shown (kfp's auto-remove loses both under podman)."""

import pytest
from kfp import dsl, local

from rlhf_pipeline.orchestration.docker_runner import docker_runner, network_mode
from tests.deploy.images_helpers import image_ref, local_images_or_skip

pytestmark = pytest.mark.slow


@pytest.fixture()
def ops_image():
    return image_ref(local_images_or_skip(), "ops")


def run_in_containers(tmp_path, task_factory):
    """Run `task_factory()` (a component call) with the project's DockerRunner; the pipeline root under tmp_path."""
    out = tmp_path / "out"
    data = tmp_path / "input" / "Posts.xml"
    data.parent.mkdir(parents=True)
    data.write_text("<posts/>")
    with docker_runner(out / "kfp", data, {"PYTHONUNBUFFERED": "1"}, f"sqlite:///{out}/mlflow.db") as runner:
        local.init(runner=runner, pipeline_root=str(out / "kfp"), raise_on_error=True)
        return task_factory()


def test_a_component_runs_as_the_image_user_without_network_and_returns_its_output(tmp_path, ops_image, capfd):
    @dsl.component(base_image=ops_image, install_kfp_package=False)
    def who_am_i(x: int) -> str:
        import os
        import socket

        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            net = "network"
        except OSError:
            net = "no-network"
        return f"{os.getuid()}:{os.getgid()}:{net}:{x * 7}"

    task = run_in_containers(tmp_path, lambda: who_am_i(x=6))
    assert task.output == "10001:0:no-network:42"


def test_a_failing_component_fails_the_task_and_shows_its_log(tmp_path, ops_image, capfd):
    @dsl.component(base_image=ops_image, install_kfp_package=False)
    def fails() -> str:
        print("marker: the step is about to fail", flush=True)
        raise SystemExit(3)

    with pytest.raises(RuntimeError, match="FAILURE"):
        run_in_containers(tmp_path, fails)
    assert "marker: the step is about to fail" in capfd.readouterr().out


def test_network_only_for_an_mlflow_server():
    assert network_mode("sqlite:////tmp/x/mlflow.db") == "none"
    assert network_mode("http://127.0.0.1:5000") == "host"


def test_runner_docker_without_local_images_is_one_error_line(tmp_path, beer_posts):
    """No podman or images needed: the missing images are found before any container starts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RLHF_IMAGES_WORKDIR": str(tmp_path / "no-images")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "run", "--runner", "docker", "--input", str(beer_posts)]
        + ["--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr  # (a machine without native bf16 adds one line about fp32 before it)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rlhf run: error: no local images ({tmp_path / 'no-images' / 'images.yaml'} not found); "
        "build them first: images/build.sh local"
    )
