"""Fused CPU kernels for the elementwise parts of a training step: RMSNorm, the SiLU-gated MLP product, LoRA
dropout's mask-and-scale, and the attention softmax with its mask.

Eager PyTorch runs transformers' RMSNorm as ~8 separate ops forward and more backward, each a full pass over the
[tokens, hidden] activations; on a 2-core CPU a SmolLM2 reward step spends more time there than in attention.
`torch.compile` turns each function below into one generated C++ loop per direction (docs/benchmarks.md, "Why
each CPU kernel exists", has the timings). Only these small functions are compiled, with
dynamic shapes: a few seconds of compilation per process (cached on disk by inductor), no graph breaks, and the
rest of the model -- LoRA, our attention, the loss -- stays eager.

Opt-in (`cpu_kernels: fused`, the CPU recipes turn it on): it needs a C++ compiler at run time. When compiling fails,
`fuse_elementwise` says so in one line and the model runs eager, unchanged.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, round to the input dtype, then scale."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act_fn(gate_proj(x)) * up_proj(x) of a SiLU-gated MLP."""
    return F.silu(gate) * up


def masked_scale(x: torch.Tensor, draws: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FastDropout's apply step: x * (scale where the 15-bit draw < threshold, else 0)."""
    keep = (draws & 0x7FFF) < threshold
    # one multiplier tensor (scale or 0) in x's dtype: the backward is then a single multiply as well
    multiplier = torch.where(
        keep, torch.tensor(scale, dtype=x.dtype, device=x.device), torch.tensor(0.0, dtype=x.dtype, device=x.device)
    )
    return x * multiplier


def masked_softmax(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(scores + bias) over the last dim (math_attention's probabilities)."""
    return torch.softmax(scores + bias, dim=-1)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


@functools.cache
def compiler_available() -> bool:
    """Compile and run one tiny function (forward and backward) once per process."""
    try:
        x = torch.ones(2, 4, requires_grad=True)
        _compiled(silu_mul)(x, x).sum().backward()
        return True
    except Exception as error:  # no C++ compiler, unsupported platform, ...: run eager
        report_unavailable("fused kernels", "running eager", error)
        return False


def report_unavailable(what: str, fallback: str, error: Exception) -> None:
    """The one stderr line a CPU kernel prints when it cannot be built: what, the fallback, the error's first line."""
    lines = str(error).strip().splitlines()
    print(f"{what} unavailable, {fallback} ({type(error).__name__}: {lines[0] if lines else ''})", file=sys.stderr)


def _norm_forward(module, hidden):
    return _compiled(rms_norm)(hidden, module.weight, module.variance_epsilon)


def _mlp_forward(module, x):
    return module.down_proj(_compiled(silu_mul)(module.gate_proj(x), module.up_proj(x)))


def _is_rms_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _is_silu_gated_mlp(module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and act is not None
        and "silu" in type(act).__name__.lower()
    )


def fused(fn):
    """`fn` (one of this module's functions) compiled when fusion was switched on, else `fn` itself (eager)."""
    return _compiled(fn) if _enabled else fn


_enabled = False  # set by fuse_elementwise: FastDropout and math_attention then use the fused kernels too


def fuse_elementwise(model: torch.nn.Module) -> int:
    """Route every RMSNorm and SiLU-gated MLP of `model` through the compiled kernels (the modules keep their
    weights and state-dict keys; only `forward` is replaced on the instance), and switch FastDropout's and the
    CPU math attention's elementwise steps to theirs. Returns how many modules now run fused: 0 when the
    compiler is unavailable."""
    global _enabled
    if not compiler_available():
        return 0
    _enabled = True
    count = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = functools.partial(_norm_forward, module)
            count += 1
        elif _is_silu_gated_mlp(module):
            module.forward = functools.partial(_mlp_forward, module)
            count += 1
    return count
