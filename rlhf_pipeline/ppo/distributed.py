"""PPO as ONE job over several processes (`accelerate launch`): each rank rolls out its share of the step's
prompts, and everything that depends on the whole batch -- advantage whitening, the KL fed to the adaptive
controller, the finite-loss guard, the logged metrics -- is computed over every rank. With one process each
function is the plain single-process computation."""

from __future__ import annotations

import torch

from rlhf_pipeline.training.losses import masked_whiten


def sum_over_processes(accelerator, values: torch.Tensor) -> float:
    """The sum of `values` over every process (float64)."""
    total = values.detach().double().sum().to(accelerator.device)
    return float(accelerator.reduce(total, "sum"))


def all_finite(accelerator, value: torch.Tensor) -> bool:
    """Whether `value` is finite on every process (one all-reduce)."""
    finite = torch.isfinite(value.detach()).all().double().to(accelerator.device)
    return bool(accelerator.reduce(finite, "sum") == accelerator.num_processes)


def mean_scalars_over_processes(accelerator, values) -> list[torch.Tensor]:
    """Each scalar's mean over the processes (float64, one all-reduce)."""
    stacked = torch.stack([torch.as_tensor(v).detach().double().reshape(()) for v in values])
    return list(accelerator.reduce(stacked.to(accelerator.device), "mean").unbind())


def whiten_over_processes(accelerator, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`masked_whiten` with the mean and (unbiased) variance of the masked values of EVERY process (all-reduced
    masked sums); exactly `masked_whiten` with one process."""
    if accelerator.num_processes == 1:
        return masked_whiten(values, mask)
    weights = mask.to(values.dtype)
    sums = accelerator.reduce(torch.stack([(values * weights).sum(), weights.sum()]).double(), "sum")
    count = sums[1].clamp(min=1.0)
    mean = sums[0] / count
    squares = accelerator.reduce(((values.double() - mean) ** 2 * weights.double()).sum(), "sum")
    variance = squares / count
    if sums[1] > 1:
        variance = variance * sums[1] / (sums[1] - 1)
    mean, variance = mean.to(values.dtype), variance.to(values.dtype)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * weights


def gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows [b, ...] as one tensor [B, ...] in rank order; a second dim (the response length,
    which may differ per process) is padded with zeros first (a zero mask hides the padding)."""
    tensor = tensor.detach().to(accelerator.device)
    if tensor.dim() > 1:
        tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=0)
    return accelerator.gather(tensor)


def gather_strings(accelerator, texts: list[str]) -> list[str]:
    """Every process's strings in rank order."""
    if accelerator.num_processes == 1:
        return texts
    from accelerate.utils import gather_object

    return list(gather_object(list(texts)))
