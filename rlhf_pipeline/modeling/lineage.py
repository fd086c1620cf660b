"""Which weights a model was trained on, recorded by the stage that trained it, so a later stage can decide
"the same base" without comparing tensors (which a 4-bit or 8-bit base no longer has in comparable form).

    record_lineage(adapter_dir, merged_dir)   after a stage saved its model (training/outputs.finish_stage):
        merged/lineage.json   {"weights_sha256": <content hash of merged/'s safetensors>}
        adapter/lineage.json  {"base_weights_sha256": <content hash of the base the adapter was trained on>}
    weights_sha256(model_dir)                 merged/lineage.json's value when recorded, else computed
    trained_on(adapter_dir, model_dir)        True / False from the records, None when a record is missing

The hash is SHA-256 over the model's safetensors files (names and bytes, in name order): the same files give
the same hash wherever they are copied, a re-merge or another base gives another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

LINEAGE_FILE = "lineage.json"


def hash_safetensors(model_dir: str | Path) -> str | None:
    """SHA-256 of the *.safetensors files of `model_dir` (None when it holds none)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def weights_sha256(model_dir: str | Path) -> str | None:
    """The content hash of a model directory's weights: its recorded one (lineage.json), else computed."""
    recorded = _read(Path(model_dir) / LINEAGE_FILE).get("weights_sha256")
    return recorded or hash_safetensors(model_dir)


def local_model_dir(name_or_path: str | None) -> Path | None:
    """A model directory on this machine for a path or a hub id in the local Hugging Face cache, else None."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached, not a valid id: no record, the caller falls back
        return None


def record_lineage(adapter_dir: str | Path, merged_dir: str | Path) -> dict[str, str | None]:
    """Write merged/lineage.json (the merged weights' hash) and adapter/lineage.json (the hash of the base named
    in the adapter's adapter_config.json). Returns both values."""
    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    base_name = _read(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    base_dir = local_model_dir(base_name)
    base_hash = weights_sha256(base_dir) if base_dir is not None else None
    merged_hash = hash_safetensors(merged_dir)
    (merged_dir / LINEAGE_FILE).write_text(json.dumps({"weights_sha256": merged_hash}, indent=1) + "\n")
    (adapter_dir / LINEAGE_FILE).write_text(
        json.dumps({"base_model": base_name, "base_weights_sha256": base_hash}, indent=1) + "\n"
    )
    return {"base_weights_sha256": base_hash, "weights_sha256": merged_hash}


def trained_on(adapter_dir: str | Path, model_dir: str | Path) -> bool | None:
    """Whether the adapter was trained on exactly the weights of `model_dir`, from the recorded hashes; None when
    the adapter has no record (an output of an older version) or `model_dir` has no weights to hash."""
    recorded = _read(Path(adapter_dir) / LINEAGE_FILE).get("base_weights_sha256")
    if not recorded:
        return None
    ours = weights_sha256(model_dir)
    if ours is None:
        return None
    return recorded == ours
