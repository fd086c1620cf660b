"""Registered versions as MLflow models (MLflow's transformers flavor), and back to plain model directories.

    register_stage_model(run, adapter_dir, merged_dir, task=..., weights=...)   at the end of a training stage
    model_reference(path)        the `models:/<name>/<N>` a stage input came from (lineage), else the name as given
    export_merged(uri, dst)      a registered version -> a Hugging Face dir with merged safetensors weights

What a version holds (`weights`):
- "adapter" (causal LMs: SFT, PPO, DPO): the LoRA adapter + tokenizer (MBs), saved by the flavor with a reference
  to its base (`base_model_path`: the local directory the adapter was trained on). `mlflow.transformers.load_model`
  rebuilds base + adapter where that directory exists (the training machine, the cluster's model-cache PVC); pass
  `base_model_path=` elsewhere, or use `export_merged`, which follows `rlhf.parent_model` (the base's own
  registered version, or the embedded model's alias) when the recorded directory is gone.
- "merged": the full merged model (the only choice for the reward model: the flavor cannot rebuild a 1-label score
  head on a causal-LM base, and the adapter falls back to it when its base is not a local directory).
A reward model is a `text-classification` model whose pipeline returns the raw score (`function_to_apply="none"`):
for texts `format_example(template, question, answer) + eos_token` (what the reward stage scores),
`mlflow.pyfunc.load_model(uri).predict(texts)["score"]` are the rewards our scorer computes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import METRICS_FILE, StageResult

Task = Literal["text-generation", "text-classification"]
Weights = Literal["adapter", "merged"]
PARENT_KEY = "rlhf.parent_model"  # MLmodel metadata: what the adapter's base is, as a registered version or name
WEIGHTS_KEY = "rlhf.weights"
LOCAL_BASE_KEY = "local_base_model_path"  # the flavor's key for the adapter's base directory
# what loading needs; MLflow's own inference would load the model again in a subprocess (slow, and it asks for
# torchvision for a PEFT model)
REQUIREMENTS = ("mlflow", "transformers", "torch", "safetensors", "accelerate")


def pip_requirements(peft: bool) -> list[str]:
    """The installed versions of what loading the model needs, pinned."""
    pinned = []
    for package in (*REQUIREMENTS, "peft") if peft else REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pinned


@contextmanager
def _quiet_flavor() -> Iterator[None]:
    """The flavor's hub look-ups for a local directory (model card, license) warn on every save: not news here."""
    logger = logging.getLogger("mlflow.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _local_base(adapter_dir: Path) -> Path | None:
    """The directory the adapter was trained on (adapter_config.json), when it is one on this machine."""
    import json

    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    path = Path(base).expanduser() if base else None
    return path if path is not None and (path / "config.json").is_file() else None


def save_mlflow_model(
    adapter_dir: str | Path,
    merged_dir: str | Path,
    dst: str | Path,
    *,
    task: Task,
    weights: Weights,
    parent: str | None = None,
) -> Weights:
    """Write an MLflow model (MLmodel + transformers flavor) of the stage output to `dst`; returns what it holds
    ("merged" where an adapter cannot be saved with a base reference)."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    base_dir = _local_base(adapter_dir) if weights == "adapter" and task == "text-generation" else None
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    if base_dir is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        saved: Weights = "adapter"
    else:
        auto = AutoModelForCausalLM if task == "text-generation" else AutoModelForSequenceClassification
        model = auto.from_pretrained(str(merged_dir))
        saved = "merged"
    if task == "text-classification":
        _pad_apart_from_eos(model, tokenizer)
    metadata = {WEIGHTS_KEY: saved, **({PARENT_KEY: parent} if parent else {})}
    with _quiet_flavor():
        mlflow.transformers.save_model(
            {"model": model, "tokenizer": tokenizer},
            str(dst),
            task=task,
            base_model_path=str(base_dir) if base_dir is not None else None,
            # rewards, not probabilities: the pipeline would apply a sigmoid to a single logit
            model_config={"function_to_apply": "none"} if task == "text-classification" else None,
            pip_requirements=pip_requirements(peft=saved == "adapter"),
            metadata=metadata,
        )
    return saved


def _pad_apart_from_eos(model, tokenizer) -> None:
    """A sequence classifier reads its score at the last token that is not the pad id; with pad == EOS (SmolLM2)
    that is the token BEFORE the EOS our reward models score at. Another special token as pad (only in the MLflow
    model) makes the pipeline score the same position: the EOS the text ends with."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    pad = next((t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token), None)
    if pad is None:
        raise UserError("the reward model's tokenizer has no special token but EOS to pad with")
    tokenizer.pad_token = pad
    model.config.pad_token_id = tokenizer.pad_token_id


def register_stage_model(
    run,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    *,
    task: Task,
    weights: Weights,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    artifact_path: str = "model",
) -> dict[str, Any] | None:
    """The stage output as an MLflow model, registered through `run.register` (`tracking.StageRun`: one version
    per run, one-line errors); its base is recorded as the run's `base_model` lineage (a `models:/` URI when the
    input was a registered version)."""
    if not run.register_enabled:
        return None
    with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=Path(merged_dir).parent) as tmp:
        dst = Path(tmp) / "model"
        saved = save_mlflow_model(
            adapter_dir, merged_dir, dst, task=task, weights=weights, parent=run.lineage.get("base_model")
        )
        return run.register(dst, name=name, artifact_path=artifact_path, tags={**(tags or {}), "weights": saved})


def model_reference(model: str | None) -> str | None:
    """The registered version a stage input came from: `models:/<name>/<N>` from the metrics.json of the stage
    output that holds it (`<output>/merged` or `<output>`), else `model` as given (a base model's name or path)."""
    if not model or model.startswith("models:/"):
        return model
    path = Path(model).expanduser()
    for stage_dir in (path, path.parent):
        if (stage_dir / METRICS_FILE).is_file():
            try:
                registered = StageResult.read(stage_dir).registered
            except UserError:  # an unreadable record: the path is still a true lineage
                return model
            return registered[-1].uri if registered else model
    return model


def _download(uri: str, dst: Path, what: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:  # MlflowException, HTTP and OS errors alike: one line for the user
        raise UserError(f"cannot download {what}: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}") from None


def export_merged(uri: str, dst: str | Path, what: str | None = None) -> Path:
    """A plain Hugging Face directory (config.json, merged safetensors weights, tokenizer) of the registered
    version `uri` under `dst`: what evaluation loads, and what serving wants. A version registered before
    versions were MLflow models (a plain model directory) is returned as downloaded. `what` names it in errors."""
    from mlflow.models import Model

    dst = Path(dst)
    local = _download(uri, dst / "mlflow-model", what or uri)
    if not (local / "MLmodel").is_file():
        if (local / "config.json").is_file():
            return local
        raise UserError(f"{uri} holds neither an MLflow model (MLmodel) nor a model directory (config.json)")
    mlmodel = Model.load(str(local / "MLmodel"))
    flavor = mlmodel.flavors.get("transformers")
    if flavor is None:
        raise UserError(f"{uri} is not a transformers model (flavors: {', '.join(mlmodel.flavors)})")
    base = flavor.get(LOCAL_BASE_KEY)
    if base and not (Path(base) / "config.json").is_file():
        base = _parent_dir((mlmodel.metadata or {}).get(PARENT_KEY), uri, dst / "base")
    return _merge_and_save(local, base, dst / "merged", uri)


def _parent_dir(parent: str | None, uri: str, dst: Path) -> str:
    """The adapter's base where its recorded directory is gone: its own registered version, or a base model."""
    if not parent:
        raise UserError(f"{uri}: the adapter's base directory is gone and no {PARENT_KEY} names it")
    if parent.startswith("models:/"):
        return str(export_merged(parent, dst))
    from rlhf_pipeline.modeling.loading import resolve_model_path

    return resolve_model_path(parent)


def _merge_and_save(local: Path, base: str | None, dst: Path, uri: str) -> Path:
    import mlflow

    try:
        components = mlflow.transformers.load_model(str(local), return_type="components", base_model_path=base)
    except Exception as exc:  # the flavor raises whatever transformers / peft raise
        raise UserError(f"cannot load {uri}: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}") from None
    model = components["model"]
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter on its base
        model = model.merge_and_unload()
    shutil.rmtree(dst, ignore_errors=True)
    model.save_pretrained(str(dst), safe_serialization=True)
    components["tokenizer"].save_pretrained(str(dst))
    return dst
