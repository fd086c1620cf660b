"""Checks of a training stage's model before any work: one clear line for what would otherwise be a traceback
deep inside transformers or peft, minutes later.

`check_model(cfg)` on a model directory (a Hugging Face hub id is left to transformers):
- it has a tokenizer (an adapter-only directory has none: point --model at the stage's merged/);
- every `*.safetensors` file opens and lists tensors (a truncated or corrupt file does not);
- the weights' shapes are those the config describes (built on the meta device: no memory, no compute);
- each LoRA target module names a module the model has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_model(cfg: Any, *, model: str | None = None, task: str = "CAUSAL_LM") -> None:
    from rlhf_pipeline.modeling.loading import resolve_model_path

    name = model or cfg.model
    path = Path(resolve_model_path(name))  # missing path / not a model dir: one line already
    if not path.is_dir():
        return  # a hub id
    if not (path / "config.json").is_file():
        raise UserError(f"--model {name} holds only a LoRA adapter (no config.json): use the stage's merged/ directory")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"--model {name} has no tokenizer ({', '.join(TOKENIZER_FILES)} missing)")
    shapes = _safetensors_shapes(path, name)
    expected = _expected_shapes(path, name, task, getattr(cfg, "trust_remote_code", False))
    if shapes and expected is not None:
        wrong = [k for k, shape in shapes.items() if k in expected and expected[k] != shape]
        if wrong:
            key = wrong[0]
            raise UserError(
                f"--model {name}: {key} has shape {list(shapes[key])} but config.json implies {list(expected[key])}"
                f" ({len(wrong)} mismatched tensor{'s' if len(wrong) > 1 else ''})"
            )
    targets = getattr(cfg, "lora_target_modules", None)
    if targets and expected is not None:
        leaf_names = {k.rsplit(".", 2)[-2] for k in expected if k.endswith(".weight") and "." in k}
        unknown = [t for t in targets if t.isidentifier() and t not in leaf_names]  # regexes: left to peft
        if unknown:
            known = sorted(n for n in leaf_names if n.endswith("proj"))[:8]
            raise UserError(f"--lora-target-modules {','.join(unknown)}: not modules of {name} (it has {known})")


def _safetensors_shapes(path: Path, name: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error type, or OSError, for a damaged file
            raise UserError(f"--model {name}: {file.name} is not a readable safetensors file ({_first(exc)})") from None
    if not files and not list(path.glob("*.gguf")):
        raise UserError(f"--model {name} has no *.safetensors weights (pickled .bin weights are not loaded)")
    return shapes


def _expected_shapes(path: Path, name: str, task: str, trust_remote_code: bool) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes the config describes, with and without the model-class prefix; None when unknown."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name}: config.json is not a model config ({_first(exc)})") from None
    builder = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = builder.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an architecture this transformers cannot build: leave it to the real load
        return None
    shapes = {}
    for key, tensor in model.state_dict().items():
        shapes[key] = tuple(tensor.shape)
        prefix, _, rest = key.partition(".")
        if rest and prefix == getattr(model, "base_model_prefix", None):
            shapes[rest] = tuple(tensor.shape)  # checkpoints may omit the prefix
    return shapes


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
