"""The GPU step images of `images/build.sh local-gpu` (CUDA torch wheels from PyPI), checked without a GPU: each
starts as the non-root user, imports torch, transformers, peft, bitsandbytes and its stage module, and its torch
is built for the CUDA of the production base (images/bases.env). Built on demand only (GBs), so this skips when
they are absent, also in CI."""

from __future__ import annotations

import re
import shutil

import pytest

from rlhf_pipeline import stages
from tests.deploy.images_helpers import ROOT, podman

pytestmark = pytest.mark.slow

CHECK = (
    "import os, torch, transformers, peft, bitsandbytes, importlib, sys; "
    "importlib.import_module(sys.argv[1]); "
    "print(os.getuid(), os.getgid(), torch.version.cuda, torch.cuda.is_available(), bitsandbytes.__version__)"
)


def base_cuda_version() -> str:
    """'13.0' from CUDA_BASE=docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04."""
    env = dict(re.findall(r"^(\w+)=(.*)$", (ROOT / "images" / "bases.env").read_text(), re.M))
    return ".".join(re.search(r":(\d+)\.(\d+)", env["CUDA_BASE"]).groups())


def gpu_image(stage) -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed")
    found = podman(
        "images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/rlhf-{stage.image.replace('_', '-')}-gpu"
    )
    refs = found.stdout.split()
    if not refs:
        pytest.skip("no GPU images here (images/build.sh local-gpu builds them, on demand)")
    return refs[0]


@pytest.mark.parametrize("stage", stages.gpu_stages(), ids=lambda s: s.key)
def test_gpu_image_imports_its_stage_as_non_root_with_the_base_cuda(stage):
    image = gpu_image(stage)
    module = stage.run.split(":")[0]
    r = podman("run", "--rm", "--network=none", image, "python", "-c", CHECK, module, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    uid, gid, cuda, available, bnb = r.stdout.split()[-5:]
    assert (uid, gid) == ("10001", "0")
    assert cuda == base_cuda_version()
    assert available == "False"  # no GPU here: the check is that it imports, not that it runs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"bitsandbytes=={bnb}"' in pyproject
