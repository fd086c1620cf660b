"""The locally built images (images/build.sh local) for the tests that run containers: podman with the project's
private storage, and a skip (or, where $RLHF_REQUIRE_IMAGES=1, as in CI, a failure) when they are not there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PODMAN_ENV = ROOT / "images" / "podman-env.sh"


def podman_environment() -> dict[str, str]:
    """os.environ plus what images/podman-env.sh exports (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, TMPDIR, ...)."""
    out = subprocess.run(
        ["bash", "-c", '. "$0" && env -0', str(PODMAN_ENV)], capture_output=True, check=True, env=os.environ
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def local_images_or_skip() -> dict:
    """The parsed $RLHF_IMAGES_WORKDIR/images.yaml of `images/build.sh local`."""
    env = podman_environment()
    path = Path(env["RLHF_IMAGES_WORKDIR"]) / "images.yaml"
    missing = None
    if shutil.which("podman") is None:
        missing = "podman not installed (scripts/setup.sh images)"
    elif not path.is_file():
        missing = f"no local images ({path}); build them: images/build.sh local"
    if missing:
        if os.environ.get("RLHF_REQUIRE_IMAGES") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return yaml.safe_load(path.read_text())


def image_ref(images: dict, key: str) -> str:
    entry = images["images"][key]
    return f"{images['registry']}/{entry['name']}:{images['tag']}@{entry['digest']}"


def podman(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_environment(), check=check
    )
