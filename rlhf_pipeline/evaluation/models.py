"""The models an evaluation compares: where each policy's weights are, and the registered version to tag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import METRICS_FILE, StageResult


@dataclass
class ModelRef:
    name: str
    path: str  # a loadable model dir
    registered_uri: str | None  # models:/name/version to tag, if known


def resolve_policy(name: str, spec: str, download_dir: Path) -> ModelRef:
    """A stage output dir (uses merged/, and its metrics.json registration), a model dir, or a models:/ URI."""
    if spec.startswith("models:/"):
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(download_dir / name))
        except Exception as exc:  # MlflowException and friends: one line for the user
            raise UserError(f"cannot download policy {name}={spec}: {str(exc).splitlines()[0]}") from None
        return ModelRef(name, local, spec)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"policy {name}: {spec} not found (expected a stage output dir, a model dir or models:/ URI)")
    path = root / "merged" if (root / "merged" / "config.json").is_file() else root
    if not (path / "config.json").is_file():
        raise UserError(f"policy {name}: {spec} holds no model (no merged/config.json or config.json)")
    uri = None
    for stage_dir in (root, path.parent):
        if (stage_dir / METRICS_FILE).is_file():
            registered = StageResult.read(stage_dir).registered
            uri = registered[-1].uri if registered else None
            break
    return ModelRef(name, str(path), uri)


def tag_model_version(uri: str, tags: dict[str, float]) -> None:
    """Set tags on `models:/<name>/<version>` (the gate values `rlhf promote` reads)."""
    from mlflow.tracking import MlflowClient

    parts = uri.removeprefix("models:/").split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        raise UserError(f"expected models:/<name>/<version>, got {uri}")
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(parts[0], parts[1], key, str(value))


def resolve_judge(spec: str, download_dir: Path) -> str:
    """The judge's reward-model dir: a `rlhf reward --subset judge` output dir or a model dir as given, or a
    `models:/<prefix>-judge/<N>` URI downloaded into `download_dir`."""
    if not spec.startswith("models:/"):
        return spec
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(download_dir / "judge"))
    except Exception as exc:  # MlflowException and friends: one line for the user
        raise UserError(f"cannot download the judge model {spec}: {str(exc).splitlines()[0]}") from None
