"""`rlhf compile`: the Kubeflow pipeline as YAML (IR spec + kubernetes platform spec), validated by the real KFP
compiler. Without options it rewrites the committed `pipelines/rlhf_pipeline.yaml` (default settings, the images of
images/images.yaml); `--registry`/`--tag`/`--images-file` choose the steps' images (components/images.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.secrets import find_credentials


def default_output() -> Path:
    from pipelines.rlhf_pipeline import COMPILED

    return COMPILED


def load_settings(settings_path: str | None, trainjob: bool = False):
    from rlhf_pipeline.orchestration.settings import PipelineSettings

    overrides: dict[str, Any] = {"distributed": "trainjob"} if trainjob else {}
    return PipelineSettings.load(settings_path, overrides)


def uses_trainjob(settings_path: str | None, trainjob: bool = False) -> bool:
    """Whether the training steps launch Kubeflow Trainer TrainJobs (else they train in their own pod)."""
    return load_settings(settings_path, trainjob).distributed == "trainjob"


def image_refs(registry: str | None = None, tag: str | None = None, images_file: str | None = None):
    """The steps' images for a compile: None (the components' own, from images.yaml) unless an option is given."""
    from components.images import ImageRefs

    if not (registry or tag or images_file):
        return None
    if images_file and not Path(images_file).is_file():
        raise UserError(f"--images-file {images_file}: not found")
    return ImageRefs(Path(images_file) if images_file else None, registry, tag)


def compile_to(
    output: str | Path,
    settings_path: str | None = None,
    trainjob: bool = False,
    registry: str | None = None,
    tag: str | None = None,
    images_file: str | None = None,
    params: tuple[str, ...] = (),
    params_file: str | None = None,
) -> Path:
    """Compile to `output`, with the run defaults `params` (NAME=VALUE, over a `params_file`'s) when given; nothing
    is written when a stage option is bad or the result would carry a credential (see `refuse_credentials`)."""
    from pipelines.rlhf_pipeline import compile_pipeline

    images = image_refs(registry, tag, images_file)  # a bad registry or tag fails before the settings are read
    settings = load_settings(settings_path, trainjob)
    out = Path(output)
    if out.is_dir():
        raise UserError(f"--output {out} is a directory; give a file name (e.g. {out}/rlhf_pipeline.yaml)")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        draft = compile_pipeline(Path(tmp) / out.name, settings, images)
        if params or params_file:
            set_defaults(draft, params, params_file)
        refuse_credentials(read_spec(draft))
        return Path(shutil.move(draft, out))


def set_defaults(path: Path, params: tuple[str, ...], params_file: str | None) -> None:
    """Make `params` (over the `params_file`'s) the compiled pipeline's defaults (what the run form opens with),
    after checking their names and types against the pipeline and building every stage's config from them."""
    from rlhf_pipeline.orchestration.pipeline_params import check_run_arguments, parse_params, read_params_file

    docs = read_spec(path)
    known = docs[0]["root"]["inputDefinitions"]["parameters"]
    args = parse_params(params, known, base=read_params_file(params_file) if params_file else {})
    check_run_arguments(args, known)
    for name, value in args.items():
        known[name]["defaultValue"] = value
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")


def refuse_credentials(docs: list[Any]) -> None:
    """One line naming the place when a compiled pipeline holds a credential by value (a URI with a password,
    a token, a value under a secret-named env variable): the YAML is uploaded to Kubeflow and often committed.
    The settings are checked first; this catches what reaches the YAML any other way (recipes, defaults)."""
    for place, kind in find_credentials(docs):
        raise UserError(
            f"refusing: the pipeline would hold {kind} at {place}; pass credentials through a "
            "Kubernetes Secret (settings `secrets:`), never as a value"
        )


def read_spec(path: str | Path) -> list[Any]:
    """The YAML documents of a compiled pipeline (comments, key order and formatting do not matter)."""
    try:
        return list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"compiled pipeline not found: {path}") from None


def is_stale(committed: str | Path, settings_path: str | None = None, trainjob: bool = False, **options: Any) -> bool:
    """True when compiling now (with the same settings, trainjob and `options` of `compile_to`) gives a different
    spec than the committed file."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_to(Path(tmp) / "pipeline.yaml", settings_path, trainjob, **options)
        return read_spec(fresh) != read_spec(committed)


def summary(path: Path) -> dict[str, Any]:
    docs = read_spec(path)
    spec = docs[0]
    tasks = []

    def walk(component: dict[str, Any]) -> None:
        for task in (component.get("dag") or {}).get("tasks", {}).values():
            ref = task["componentRef"]["name"]
            sub = spec["components"].get(ref, {})
            if "dag" in sub:
                walk(sub)
            else:
                tasks.append(task["taskInfo"]["name"])

    walk(spec["root"])
    images = sorted({ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()})
    from pipelines.rlhf_pipeline import DISPLAY

    order = list(DISPLAY.values())
    tasks.sort(key=lambda t: next((i for i, d in enumerate(order) if t.startswith(d)), len(order)))
    return {
        "tasks": tasks,
        "images": images,
        "parameters": sorted(spec["root"].get("inputDefinitions", {}).get("parameters", {})),
    }
