"""Which stage, configuration, data and MLflow run an output directory belongs to: `<output>/run.json`.

Checked before any work (`check_output`: a file at `--output` or a read-only location fails in seconds, not after
training), written once the MLflow run is open (`claim_output`: a full disk fails there, still before any work),
and read by every rerun with the same `--output`:
- another stage's output (a PPO run pointed at an SFT output) is refused;
- a changed configuration or changed data (other `--data` contents, `--max-steps`, `--learning-rate`, `--lora-r`)
  is refused naming the fields, unless `--restart` asks to start over (checkpoints and result are then removed),
  so a stale result is never reported as done and a checkpoint is never continued under other settings;
- the MLflow run id recorded there is re-attached by a retry, so one logical stage run is one MLflow run.

Fields that do not change what is trained (where to track, how often to log or checkpoint, threads) are left out
of the identity: changing them resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.training.checkpoint import checkpoint_manifest, latest_checkpoint

CLAIM_FILE = "run.json"
# Not part of what a run trains: a retry may change these and still resume.
NOT_IDENTITY = frozenset(
    {
        "output",
        "restart",
        "tracking_uri",
        "experiment_name",
        "run_name",
        "registered_model_prefix",
        "register_model",
        "register_weights",
        "kfp_run_id",
        "num_threads",
        "logging_steps",
        "save_steps",
        "keep_checkpoints",
        "log_generations_every",
    }
)


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over the names and contents of the data directory's parquet files and stats.json."""
    digest = hashlib.sha256()
    root = Path(data_dir)
    if root.is_dir():
        for path in sorted([*root.glob("*.parquet"), *root.glob("stats.json")]):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def identity(cfg: Any) -> dict[str, Any]:
    """The fields that decide what a run trains, plus the data's fingerprint."""
    fields = {k: v for k, v in cfg.to_flat_dict().items() if k not in NOT_IDENTITY}
    if getattr(cfg, "data", None):
        fields["data_fingerprint"] = data_fingerprint(cfg.data)
    return fields


def identity_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def read_claim(output: str | Path) -> dict[str, Any] | None:
    path = Path(output) / CLAIM_FILE
    if not path.is_file():
        return None
    try:
        claim = json.loads(path.read_text())
        if not isinstance(claim, dict) or "stage" not in claim or "identity" not in claim:
            raise ValueError("not a run claim")
        return claim
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}): remove it or rerun with --restart") from None


def write_claim(output: str | Path, claim: dict[str, Any]) -> None:
    """Atomic write; the first write of a run doubles as the check that the output location is usable."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{CLAIM_FILE}.tmp"
        tmp.write_text(json.dumps(claim, indent=1, sort_keys=True))
        os.replace(tmp, out / CLAIM_FILE)
    except OSError as exc:
        raise UserError(f"cannot write to --output {out}: {exc.strerror or exc}") from None


def changed_fields(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def check_output(cfg: Any, stage: str) -> dict[str, Any] | None:
    """Check `cfg.output` may hold this run (see the module doc) without writing anything; returns the claim a
    previous attempt left (None for a fresh output; with --restart, what it left is discarded first)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a directory")
    _check_writable(out)
    if not out.is_dir():
        return None
    if getattr(cfg, "restart", False):
        discard_run(out)
        return None
    claim = read_claim(out)
    if claim is None:
        legacy = _foreign_result(out)
        if legacy is not None:
            raise UserError(f"{out} holds a finished {legacy} run not made by this one: use another --output")
        checkpoint = latest_checkpoint(out, report=False)
        written_with = checkpoint_manifest(checkpoint).get("config_hash") if checkpoint else None
        if written_with not in (None, identity_hash(cfg)):
            raise UserError(
                f"{checkpoint} was written with other settings (config hash {written_with}): "
                "use another --output, or --restart to discard it"
            )
        return None
    if not holds_progress(out):  # an attempt that failed before its first checkpoint: nothing to protect
        return None
    if claim["stage"] != stage:
        finished = "finished " if (out / "metrics.json").is_file() else ""
        raise UserError(f"{out} holds a {finished}{claim['stage']} run, not {stage}: use another --output")
    now = identity(cfg)
    changed = changed_fields(claim["identity"], now)
    if changed:
        shown = ", ".join(f"{k} ({claim['identity'].get(k)!r} -> {now.get(k)!r})" for k in changed[:4])
        raise UserError(
            f"{out} holds a {stage} run with other settings: {shown}{' ...' if len(changed) > 4 else ''}; "
            "use another --output, or --restart to discard it"
        )
    return claim


def claim_output(cfg: Any, stage: str, run_id: str | None) -> None:
    """Record that `cfg.output` holds this stage run (configuration identity, MLflow run id)."""
    claim = {"stage": stage, "identity": identity(cfg), "identity_hash": identity_hash(cfg), "mlflow_run_id": run_id}
    previous = read_claim(cfg.output) if Path(cfg.output).is_dir() else None
    if previous != claim:
        write_claim(cfg.output, claim)


def previous_run_id(output: str | Path) -> str | None:
    claim = read_claim(output) if Path(output).is_dir() else None
    return claim.get("mlflow_run_id") if claim else None


def _check_writable(out: Path) -> None:
    """The nearest existing directory of `out` must be writable (a read-only mount fails here, not after training)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: {probe} is not writable")


def holds_progress(out: Path) -> bool:
    """Whether a previous attempt left something a mismatched rerun must not take over: a checkpoint or a result."""
    return (
        (out / "metrics.json").is_file()
        or (out / "merged").is_dir()
        or latest_checkpoint(out, report=False) is not None
    )


def discard_run(out: Path) -> None:
    """--restart: everything a previous run left (checkpoints, model, result) goes, nothing else."""
    for name in ("checkpoints", "adapter", "merged", "metrics.json", CLAIM_FILE):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _foreign_result(out: Path) -> str | None:
    """The stage of a finished result in `out` that has no claim (written by something else), else None."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return None
    try:
        return str(json.loads(metrics.read_text()).get("stage", "unknown"))
    except (OSError, ValueError):
        return "unknown"
