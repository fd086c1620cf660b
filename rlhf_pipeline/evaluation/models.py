"""The models an evaluation compares: where each policy's weights are, and the registered version to tag."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.mlflow_model import export_merged
from rlhf_pipeline.results import METRICS_FILE, StageResult


@dataclass
class ModelRef:
    name: str
    path: str  # a loadable model dir
    registered_uri: str | None  # models:/name/version to tag, if known


def resolve_policy(name: str, spec: str, download_dir: Path) -> ModelRef:
    """A stage output dir (uses merged/, and its metrics.json registration), a model dir, or a models:/ URI."""
    if spec.startswith("models:/"):  # an MLflow model (adapter + base, or merged): merged weights to load
        return ModelRef(name, str(export_merged(spec, download_dir / name, f"policy {name}={spec}")), spec)
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
    `models:/<prefix>-judge/<N>` URI exported into `download_dir`."""
    if not spec.startswith("models:/"):
        return spec
    return str(export_merged(spec, download_dir / "judge", f"the judge model {spec}"))


def kept_checkpoints(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of the checkpoints a training stage kept (`--keep-checkpoints`), but the last: that one is
    the stage's final policy, evaluated already."""
    root = Path(stage_dir) / "checkpoints"
    if not root.is_dir() or not (Path(stage_dir) / "adapter" / "adapter_config.json").is_file():
        return []
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "trainable.safetensors").is_file()
    )
    return found[:-1]


def checkpoint_policy(name: str, checkpoint: Path, stage_dir: Path, sft_path: str, dst: Path) -> ModelRef:
    """The policy as it was at `checkpoint`: the SFT model with the stage's LoRA adapter (its config from
    `<stage_dir>/adapter/`) holding the checkpoint's LoRA weights, merged and written to `dst` (safetensors)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sft_path, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(Path(stage_dir) / "adapter"))
    params = dict(model.named_parameters())
    lora = {n for n in params if "lora_" in n}
    loaded = set()
    with torch.no_grad():
        for key, value in load_file(str(checkpoint / "trainable.safetensors")).items():
            at = key.find("base_model.model.")  # PPO prefixes `policy.`; DPO's peft model has none
            if at < 0:
                continue  # the value head
            target = key[at:]
            if target not in params:
                raise UserError(f"checkpoint {checkpoint} holds {key}, which the adapter in {stage_dir} lacks")
            params[target].copy_(value.to(params[target].dtype))
            loaded.add(target)
    if loaded != lora:
        raise UserError(f"checkpoint {checkpoint} lacks {len(lora - loaded)} LoRA weight(s) of {stage_dir}/adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(dst), safe_serialization=True)
    return ModelRef(name, str(dst), None)
