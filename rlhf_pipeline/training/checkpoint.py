"""Checkpoint and resume, safetensors only (no pickles anywhere).

A checkpoint is `<output_dir>/checkpoints/step-<N>/` holding
  trainable.safetensors   every parameter with requires_grad (LoRA weights, value/score heads)
  optimizer.safetensors   the optimizer's tensors, flattened as `state.<param index>.<name>`
  state.json              step, optimizer param groups, scheduler state, RNG states, and the caller's `extra`
It is written to a temporary directory and renamed into place, so a run killed mid-save (a preempted Kubeflow
pod) never leaves a half checkpoint that a retry would load.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"


def _checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = _checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "state.json").is_file())
    return steps[-1][1] if steps else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    root = _checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_rng": random.getstate(),
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(state, default=_json_default))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # prune old checkpoints, newest `keep` stay
    all_ckpts = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*"))
    for _, old in all_ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and RNG; return {"step": N, "extra": {...}}."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise RuntimeError(f"checkpoint {path} has parameter {name} the model lacks")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    if optimizer is not None:
        _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    py_state = state["python_rng"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return {"step": state["step"], "extra": state["extra"]}


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
