"""Frozen linear layers whose CPU matmuls use every thread: rows split across threads, one GEMM per thread.

A LoRA step on the CPU spends most of its matmul time in the frozen base projections. In bf16 those are oneDNN
AMX GEMMs, and oneDNN's work split leaves one of two threads idle for the shapes a reward or DPO batch produces
after prompt sharing and unpadding: ~900-1000 rows with 576 outputs (q_proj, o_proj, down_proj forward; the
input gradients of gate_proj and up_proj). oneDNN only splits such a GEMM across threads above ~1200-1300 rows.
Splitting the rows ourselves -- inside one OpenMP parallel region, where oneDNN runs each call single-threaded --
uses both threads (docs/benchmarks.md has the per-shape and per-step timings). Each row of the result is one
ordinary GEMM row; only the accumulation blocking may differ, i.e. the last bit of some bf16 outputs.

The per-thread split is a 20-line C++ function (`at::parallel_for` over row chunks, built once per machine with
torch's JIT extension loader and cached under ~/.cache/torch_extensions). Opt-in with `cpu_kernels: fused`, bf16 and
fp16 CPU matmuls of frozen weights only; when the extension cannot be built, `split_frozen_linears` says so in
one line and the model keeps torch's matmuls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rlhf_pipeline.cpu.fused_ops import report_unavailable

# Rows each thread must get before splitting pays (below ~256 rows oneDNN's own choice is as fast or faster).
MIN_ROWS_PER_THREAD = 256

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// out = a @ b, rows of `a` split into `chunks` contiguous blocks, one single-threaded GEMM per OpenMP thread:
// inside the parallel region oneDNN sees omp_in_parallel() and uses one thread per call.
at::Tensor row_split_mm(const at::Tensor& a, const at::Tensor& b, int64_t chunks) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  const int64_t rows = a.size(0);
  const int64_t step = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: OpenMP workers start with it on
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * step, hi = std::min(rows, lo + step);
      if (lo >= hi) continue;
      auto block = out.narrow(0, lo, hi - lo);
      at::mm_out(block, a.narrow(0, lo, hi - lo), b);
    }
  });
  return out;
}
"""


@functools.cache
def extension():
    """The compiled `row_split_mm`, or None (with one stderr line) when it cannot be built here."""
    try:
        from torch.utils.cpp_extension import load_inline

        # -fopenmp: the parallel region must be real; libgomp resolves to the copy torch already loaded
        return load_inline(
            "rlhf_row_split_mm",
            cpp_sources=_CPP_SOURCE,
            functions=["row_split_mm"],
            extra_cflags=["-O2", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, read-only cache, ...: keep torch's matmuls
        report_unavailable("row-split matmul", "using torch's", error)
        return None


def row_split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N]; rows split across torch's threads when each gets enough of them."""
    chunks, compiled = torch.get_num_threads(), extension()
    if chunks < 2 or a.shape[0] < MIN_ROWS_PER_THREAD * chunks or a.device.type != "cpu" or not compiled:
        return a @ b
    return compiled.row_split_mm(a, b, chunks)


class FrozenLinear(torch.autograd.Function):
    """y = x @ weight.T for a weight that gets no gradient: forward and input gradient both row-split."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        rows = x.reshape(-1, x.shape[-1])  # [M, in]
        return row_split_mm(rows, weight.t()).view(*x.shape[:-1], weight.shape[0])  # [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # [M, out]
        return row_split_mm(rows, weight).view(*grad_out.shape[:-1], weight.shape[1]), None  # [..., in]


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))  # what autocast would do to F.linear's input
    if (
        weight.requires_grad
        or module.bias is not None
        or x.dtype != weight.dtype
        or weight.dtype not in (torch.bfloat16, torch.float16)
        or x.device.type != "cpu"
    ):
        return F.linear(x, weight, module.bias)
    with torch.autocast("cpu", enabled=False):
        return FrozenLinear.apply(x, weight)


def split_frozen_linears(model: torch.nn.Module) -> int:
    """Route the plain `nn.Linear` layers of `model` through `FrozenLinear` (only `forward` is replaced on the
    instance; weights and state-dict keys stay). Each call still checks that its weight is frozen, bias-free and
    bf16/fp16 on the CPU, and otherwise runs `F.linear`. Returns how many layers were routed: 0 when the extension
    is unavailable."""
    if extension() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # LoRA's own A/B layers are trainable and take the F.linear branch
            module.forward = functools.partial(_linear_forward, module)
            count += 1
    return count
