"""Checkpoint and resume, safetensors only (no pickles anywhere).

A checkpoint is `<output_dir>/checkpoints/step-<N>/` holding
  trainable.safetensors   every parameter with requires_grad (LoRA weights, value/score heads)
  optimizer.safetensors   the optimizer's tensors, flattened as `state.<param index>.<name>`
  state.json              step, optimizer param groups, scheduler state, RNG states, and the caller's `extra`
  manifest.json           written LAST: step, the sha256 of every file above, the training config's hash
It is written to a temporary directory (each file fsync'ed) and renamed into place, so a run killed mid-save (a
preempted Kubeflow pod) never leaves a half checkpoint that a retry would load. A retry loads the newest checkpoint
whose manifest and hashes check out; a damaged one (truncated file, corrupt JSON, bit rot) is reported in one line
and skipped in favour of the older one `keep` leaves next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhf_pipeline.errors import UserError

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"


def _checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("step-*"):
        try:
            out.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:  # a stray `step-foo`: not ours
            continue
    return sorted(out)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (no manifest, a file missing or changed), or None if sound."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        int(manifest["step"])
    except FileNotFoundError:
        return "no manifest (an interrupted save)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its hash (truncated or corrupt)"
    return None


def latest_checkpoint(output_dir: str | Path, *, report: bool = True) -> Path | None:
    """The newest sound checkpoint under `<output_dir>/checkpoints`; damaged newer ones are reported and skipped."""
    root = _checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    for _, path in reversed(_step_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if report:
            tqdm.write(f"skipping damaged checkpoint {path}: {problem}", file=sys.stderr)
    return None


def checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    config_hash: str | None = None,
) -> Path:
    root = _checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    for stale in root.glob(".tmp-step-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}"
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
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    manifest = {"step": step, "config_hash": config_hash, "files": {n: sha256_file(tmp / n) for n in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    if final.exists():  # a re-save of the same step (a resumed run): move the old one aside first
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)
    # prune old checkpoints, newest `keep` stay
    for _, old in _step_dirs(root)[:-keep]:
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
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        missing, unknown = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
        raise UserError(
            f"checkpoint {path} does not fit this model (missing {missing[:3]}, unknown {unknown[:3]}): "
            "rerun with the configuration it was written with, or --restart"
        )
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise UserError(
                    f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}"
                    ": rerun with the configuration it was written with, or --restart"
                )
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
