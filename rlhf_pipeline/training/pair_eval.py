"""Held-out evaluation over preference pairs, shared by the reward and DPO stages.

Every pair is scored exactly once across all processes (the loader is sharded by accelerate and the outputs
gathered, padding duplicates dropped), in eval mode (no dropout), longest pairs first so that batches carry
little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def gather_over_pairs(
    accelerator,
    module: torch.nn.Module,
    forward: Callable[[dict], dict[str, torch.Tensor]],
    pairs: Sequence[tuple],
    *,
    batch_size: int,
    collate_fn: Callable[[list], dict],
    desc: str = "eval",
) -> dict[str, torch.Tensor]:
    """`forward(batch) -> {name: per-pair tensor [B]}` over every pair; returns {name: [num_pairs]} on the CPU.

    `module` is what `forward` runs (put in eval mode for the pass, then restored).
    """
    from torch.utils.data import DataLoader

    def length(pair: tuple) -> int:
        return max(len(part) for part in pair if isinstance(part, (list, tuple)))

    ordered = sorted(pairs, key=length, reverse=True)
    loader = accelerator.prepare_data_loader(DataLoader(ordered, batch_size=batch_size, collate_fn=collate_fn))
    was_training = module.training
    module.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
            with accelerator.autocast():
                values = forward(batch)
            for name, value in accelerator.gather_for_metrics(values).items():
                gathered.setdefault(name, []).append(value.float().cpu())
    finally:
        module.train(was_training)
    return {name: torch.cat(parts) for name, parts in gathered.items()}
