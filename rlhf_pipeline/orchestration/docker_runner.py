"""`rlhf run --runner docker`: every pipeline step in its own image, through kfp.local's DockerRunner and podman's
Docker-compatible API (the images: `images/build.sh local`, recorded in `$RLHF_IMAGES_WORKDIR/images.yaml`).

The steps run as the images' non-root user with no network. They see, at the same paths as the host: the output
directory (kfp's pipeline root, the stage outputs and MLflow's SQLite store + artifacts, so MLflow needs no server),
the input dump and the model cache (read-only, the cache at /opt/rlhf-cache; the host converts the embedded model into it before the run, so no
image carries an embedded model).

kfp.local runs containers with auto-remove, and podman removes them before kfp reads their logs and exit code: a
step that fails is then reported as SUCCESS with no output. `containers_keep_their_status` swaps kfp's container
call for one that runs the container without auto-remove, streams its logs, waits for its exit code and only then
removes it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PODMAN_ENV_SCRIPT = REPO / "images" / "podman-env.sh"
CONTAINER_CACHE_DIR = "/opt/rlhf-cache"  # $RLHF_CACHE_DIR in the steps' containers


def images_workdir() -> Path:
    """Where podman's private storage, configuration, socket and the local images.yaml live."""
    return Path(os.environ.get("RLHF_IMAGES_WORKDIR") or REPO / ".images").resolve()


def local_images_file() -> Path:
    return images_workdir() / "images.yaml"


@contextmanager
def podman_service() -> Iterator[str]:
    """The Docker API of podman, started for the run and stopped after it; yields its DOCKER_HOST. An existing
    $DOCKER_HOST (a Docker engine, or a service someone else started) is used as it is."""
    if os.environ.get("DOCKER_HOST"):
        yield os.environ["DOCKER_HOST"]
        return
    if not PODMAN_ENV_SCRIPT.is_file():
        raise UserError(f"{PODMAN_ENV_SCRIPT} not found: --runner docker runs from a checkout of the repository")
    socket = images_workdir() / "run" / "podman.sock"
    socket.unlink(missing_ok=True)
    log = images_workdir() / "service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RLHF_IMAGES_WORKDIR": str(images_workdir())}
    with open(log, "wb") as out:
        # podman-env.sh writes the machine-specific configuration and exports CONTAINERS_*; the service must see it.
        service = subprocess.Popen(
            ["bash", "-c", '. "$0" && exec podman system service --time=0 "unix://$PODMAN_SOCKET"', PODMAN_ENV_SCRIPT],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while not socket.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise UserError(f"the podman API service did not start: {tail[0]} (log: {log})")
            time.sleep(0.05)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def run_container_keeping_status(client, image: str, command: list[str], volumes: dict[str, Any], **run_args) -> int:
    """kfp.local's `run_docker_container` without auto-remove: the logs are streamed and the exit code read before
    the container is removed. No pull: the images are built here (images/build.sh local)."""
    import docker

    run_args.pop("auto_remove", None)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise UserError(f"image {image} is not in the local image store; build it: images/build.sh local") from None
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True, **run_args
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


@contextmanager
def containers_keep_their_status() -> Iterator[None]:
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container_keeping_status
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def step_mounts(output_dir: Path, input_path: Path, cache_dir: Path, tracking_uri: str) -> list:
    """Bind mounts at the host's paths: the output directory (and a SQLite store's directory outside it)
    read-write, the input and the model cache read-only."""
    from docker.types import Mount

    writable = {output_dir.resolve()}
    if tracking_uri.startswith("sqlite:///"):
        db_dir = Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent
        if not db_dir.is_relative_to(output_dir.resolve()):
            writable.add(db_dir)
    mounts = [Mount(str(p), str(p), type="bind", read_only=False) for p in sorted(writable)]
    mounts.append(
        Mount(str(input_path.parent.resolve()), str(input_path.parent.resolve()), type="bind", read_only=True)
    )
    # The cache at a path of its own: the host's default (~/.cache under /root) is inside a directory the
    # image's user cannot enter.
    mounts.append(Mount(CONTAINER_CACHE_DIR, str(cache_dir.resolve()), type="bind", read_only=True))
    return mounts


def network_mode(tracking_uri: str) -> str:
    """No network, unless MLflow is a server: then the host's, so that 127.0.0.1 is the host's loopback."""
    return "host" if tracking_uri.startswith(("http://", "https://")) else "none"


def open_to_the_image_user(path: Path, *, write: bool) -> None:
    """The images run as uid 10001, gid 0, and the host's files are root's: give group 0 read (and, for the
    output directory, write) access. What the host creates later gets it from the run's umask (002, set by
    `docker_runner`). The model cache needs it too: its converted models come out of mkdtemp, mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        wanted = (0o070 if write else 0o050) if p.is_dir() else (0o060 if write else 0o040)
        if mode & wanted != wanted:
            os.chmod(p, mode | wanted)


@contextmanager
def docker_runner(pipeline_root: Path, input_path: Path, step_env: dict[str, str], tracking_uri: str) -> Iterator[Any]:
    """kfp.local's DockerRunner for `rlhf run --runner docker`, with the podman service running and kfp's
    container call fixed (see the module doc); the images are those of `local_images_file()`. The output
    directory, mounted into every step, is the pipeline root's parent."""
    from kfp import local

    from rlhf_pipeline.modeling.loading import cache_root

    images = local_images_file()
    if not images.is_file():
        raise UserError(f"no local images ({images} not found); build them first: images/build.sh local")
    output_dir = pipeline_root.parent
    mounts = step_mounts(output_dir, input_path, cache_root(), tracking_uri)
    pipeline_root.mkdir(parents=True, exist_ok=True)  # else the engine creates it, 0755 root: not writable
    for mount in mounts:
        if Path(mount["Source"]) != input_path.parent.resolve():  # the input only has to be readable by anyone
            open_to_the_image_user(Path(mount["Source"]), write=not mount["ReadOnly"])
    old_umask = os.umask(0o002)
    saved = {k: os.environ.get(k) for k in ("DOCKER_HOST", "RLHF_IMAGES_FILE")}
    try:
        with podman_service() as docker_host:
            os.environ["DOCKER_HOST"] = docker_host
            os.environ["RLHF_IMAGES_FILE"] = str(images)
            runner = local.DockerRunner(
                network_mode=network_mode(tracking_uri),
                mounts=mounts,
                environment={**step_env, "RLHF_CACHE_DIR": CONTAINER_CACHE_DIR, "HF_HUB_OFFLINE": "1"},
            )
            with containers_keep_their_status():
                yield runner
    finally:
        os.umask(old_umask)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
