"""CPU-only speed-ups, behind ONE entry point: `speed_up(model, level)`. Nothing here is imported unless a
recipe asks for it (`cpu_kernels: eager | fused`), and nothing here is ever active on CUDA.

    eager   LoRA dropout with a cheaper random draw (`FastDropout`, still an nn.Dropout) and batched-matmul
            attention for the unpadded pair batches of the reward and DPO stages
    fused   eager + torch.compile'd RMSNorm / SiLU-gated MLP / dropout / softmax, and frozen bf16 matmuls whose
            rows are split across threads (a small C++ extension; needs a compiler and ninja: the `cpu` extra)

Each speed-up is exact up to float rounding (tests compare logits and every gradient with the plain model), and
each one that cannot be built here (no compiler) says so in one line and leaves the model as it was. Why they
exist and what they gain: docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from typing import Literal

CPUKernels = Literal["off", "eager", "fused"]


def speed_up(model, level: CPUKernels) -> dict[str, int]:
    """Switch `model` (a PeftModel after LoRA was applied) to the CPU kernels of `level`; returns how many modules
    each speed-up took over. A model on another device is left alone (one line says so)."""
    if level == "off":
        return {}
    device = next(model.parameters()).device
    if device.type != "cpu":
        print(f"cpu_kernels={level} ignored: the model is on {device.type}, not the CPU", file=sys.stderr)
        return {}
    from rlhf_pipeline.cpu.fast_dropout import use_fast_dropout
    from rlhf_pipeline.cpu.math_attention import use_math_attention

    counts = {"fast_dropout": use_fast_dropout(model), "math_attention": use_math_attention(model)}
    if level == "fused":
        from rlhf_pipeline.cpu.fused_ops import fuse_elementwise
        from rlhf_pipeline.cpu.row_split_matmul import split_frozen_linears

        counts.update(fused_elementwise=fuse_elementwise(model), row_split_linears=split_frozen_linears(model))
    return counts
