"""Padded batches: the ONE right/left padding routine, and the collations built on it.

pad(seqs, pad_id, side="left")          -> (input_ids [B, L], attention_mask [B, L])   generation prompts
collate_padded(docs, pad_id)            -> input_ids, attention_mask, labels (-100 on padding)   SFT unpacked
collate_pairs(pairs, pad_id, ...)       -> 2B rows [chosen_1..B, rejected_1..B] or B shared-prefix rows
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from rlhf_pipeline.batching.packing import IGNORE_INDEX
from rlhf_pipeline.batching.shared_prefix import collate_shared_prefix


def pad(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    side: Literal["left", "right"] = "right",
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, L], attention_mask [B, L]), padded on `side` to the longest."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids.to(device), attention_mask.to(device)


def truncate_documents(documents: list[list[int]], seq_length: int) -> list[list[int]]:
    return [doc[:seq_length] for doc in documents]


def collate_padded(documents: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: attention_mask 1 on real tokens, labels -100 on padding."""
    input_ids, attention_mask = pad(documents, pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    shared_prefix: bool = False,
    response_starts: Sequence[tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """One batch that scores both sides of each (chosen, rejected) pair in a single forward.

    shared_prefix: B rows that compute each pair's common prefix once (see shared_prefix.py); else 2B
    right-padded rows, chosen first then rejected. Either way the outputs come back [chosen..., rejected...].
    `response_starts` (DPO): the first response token of each side; adds what the response log-probs need
    (a `label_mask` on the response tokens of the padded rows, the label indices of shared-prefix rows).
    """
    if shared_prefix:
        return collate_shared_prefix(pairs, pad_token_id, response_starts)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    input_ids, attention_mask = pad(sequences, pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if response_starts is not None:
        starts = [s for s, _ in response_starts] + [s for _, s in response_starts]
        label_mask = torch.zeros_like(attention_mask)
        for row, (seq, start) in enumerate(zip(sequences, starts)):
            label_mask[row, start : len(seq)] = 1
        batch["label_mask"] = label_mask
    return batch


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] outputs of a pair batch -> (chosen [B], rejected [B])."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
