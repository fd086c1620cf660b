"""Container image references for the pipeline's components, read from `images/images.yaml`.

`images/build.sh push` builds every image under one tag and records each pushed digest in that file;
`image_for("sft")` turns an entry into `registry/name:tag@sha256:...`. Kubeflow's step cache keys on
the image string, so with a digest a re-pushed tag can never be mistaken for a cached one; without one
(nothing pushed yet) the reference is `registry/name:tag`. A stage's component takes `stage_image(key)`:
the entry named by the stage's registry declaration (`Stage.image` in rlhf_pipeline/stages.py).

Where the file is read from: `$RLHF_IMAGES_FILE` if set (the ops image sets it: the installed wheel
carries no `images/` directory), else `images/images.yaml` at the repository root.

`rlhf compile --registry REG --tag T` retargets every step: `image_for(key, registry=REG, tag=T)` is
`REG/<name>:T`, with the file's digest only when REG and T are the file's own (a digest belongs to the image it was
read from). The components carry the file's references from import; `ImageRefs` sets the chosen ones per task.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import UserError

IMAGES_FILE_ENV = "RLHF_IMAGES_FILE"
REPO_IMAGES_FILE = Path(__file__).resolve().parents[1] / "images" / "images.yaml"

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Docker's reference grammar, simplified: lowercase path components and a tag of [\w][\w.-]{0,127}.
_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
# A registry prefix `host[:port][/path...]` or `path...`, as the distribution reference grammar reads a name's
# leading part (github.com/distribution/reference, reference.go): a domain only before the first slash.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_REGISTRY = re.compile(rf"^(?:{_HOST}|{_PATH_PART})(?:/{_PATH_PART})*$")


def check_registry(registry: str) -> str:
    """`registry` without a trailing slash; one line when it cannot prefix an image reference."""
    value = registry.strip().rstrip("/")
    if not _REGISTRY.match(value):
        raise UserError(
            f"--registry {registry!r} is not a valid image registry (want host[:port][/path], e.g. ghcr.io/org; "
            "no scheme, lowercase path)"
        )
    return value


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise UserError(f"--tag {tag!r} is not a valid image tag (letters, digits, _ . -; at most 128)")
    return tag


def images_file() -> Path:
    """The images.yaml in effect (see module doc)."""
    override = os.environ.get(IMAGES_FILE_ENV)
    return Path(override) if override else REPO_IMAGES_FILE


@lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> dict[str, Any]:  # mtime in the key: a rewritten file is re-read
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"image list not found: {path} (set ${IMAGES_FILE_ENV} or run images/build.sh)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise UserError(f"{path} must have 'registry', 'tag' and an 'images' mapping")
    for key in ("registry", "tag"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UserError(f"{path}: '{key}' must be a non-empty string")
    if not _TAG.match(data["tag"]):
        raise UserError(f"{path}: invalid tag {data['tag']!r}")
    return data


def load_images(path: Path | None = None) -> dict[str, Any]:
    """The parsed, checked images file."""
    path = path or images_file()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        mtime = 0
    return _load(path, mtime)


def image_for(component: str, path: Path | None = None, registry: str | None = None, tag: str | None = None) -> str:
    """`registry/name:tag@sha256:...` for `component` (a key of images.yaml), digest-less if none recorded or when
    `registry`/`tag` retarget it (see the module doc)."""
    path = path or images_file()
    data = load_images(path)
    own = (data["registry"].rstrip("/"), data["tag"])
    target = (check_registry(registry) if registry else own[0], check_tag(tag) if tag else own[1])
    data = {**data, "registry": target[0], "tag": target[1]}
    entry = data["images"].get(component)
    if not isinstance(entry, dict) or not entry.get("name"):
        known = ", ".join(sorted(data["images"]))
        raise UserError(f"no image for component '{component}' in {path} (known: {known})")
    repo = f"{data['registry'].rstrip('/')}/{entry['name']}"
    # The registry part may carry a port (host:5000); only the path below it follows the name grammar.
    if not _NAME.match(repo.split("/", 1)[1] if "/" in repo else repo):
        raise UserError(f"{path}: invalid image name {repo!r}")
    ref = f"{repo}:{data['tag']}"
    digest = entry.get("digest") if target == own else None
    if digest:
        if not _DIGEST.match(str(digest)):
            raise UserError(f"{path}: invalid digest for '{component}': {digest!r} (want sha256:<64 hex>)")
        ref += f"@{digest}"
    return ref


def stage_image(stage: str, path: Path | None = None) -> str:
    """The image of a registry stage: the images.yaml entry its `Stage.image` names."""
    from rlhf_pipeline.stages import get

    return image_for(get(stage).image, path)


@dataclass(frozen=True)
class ImageRefs:
    """The image of each images.yaml key for one compile: the file (`path`, default `images_file()`), retargeted
    to `registry`/`tag` when given."""

    path: Path | None = None
    registry: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:  # a bad registry or tag fails before anything is compiled
        if self.registry:
            check_registry(self.registry)
        if self.tag:
            check_tag(self.tag)

    def __call__(self, key: str) -> str:
        return image_for(key, self.path, self.registry, self.tag)

    def stage(self, stage: str) -> str:
        from rlhf_pipeline.stages import get

        return self(get(stage).image)


def default_base_image() -> str:
    """Image for small glue components that have no stage image of their own: the CPU ops image,
    which has the project (and kfp) installed."""
    return image_for("ops")


def __getattr__(name: str) -> str:
    # `from components.images import DEFAULT_BASE_IMAGE` works, but is resolved on access (PEP 562):
    # a missing images.yaml then fails where the image is used, with a one-line error, never as "".
    if name == "DEFAULT_BASE_IMAGE":
        return default_base_image()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
