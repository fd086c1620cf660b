"""Chosen and rejected in ONE row that computes their common prefix (the prompt) once; short pairs share rows.

A preference pair is two sequences that begin with the same tokens: the prompt, sometimes a few response tokens
too. Under causal attention those shared tokens have the same hidden states in both sequences, so computing them
twice is waste. The reward and DPO stages therefore lay a pair out as one segment

    [ shared prefix (S) | rest of chosen (C) | rest of rejected (K) ]
    positions 0..S-1      S..S+C-1            S..S+K-1

with a custom attention mask: prefix tokens attend causally to the prefix; a chosen token to the prefix and the
earlier chosen tokens; a rejected token to the prefix and the earlier rejected tokens (never to chosen). Positions
restart at S for the rejected part, so every token sees exactly the keys and RoPE positions it would see in its
own unpadded sequence: the scores and log-probs equal those of the two-row layout up to float rounding (tested).

Rows are as long as the batch's longest pair, and shorter pairs are packed into them first-fit-decreasing (no
attention between pairs), so a batch of pairs takes fewer rows and less padding; padding attends only to itself
(a row of the mask must not be empty, or sdpa returns NaN). The price: a row is longer, and sdpa computes the
full L x L scores of every row, so attention work per pair grows while everything else shrinks (docs/benchmarks.md
has the positions and step times of both layouts).

Needs an attention implementation that accepts a custom 4-D mask: sdpa (boolean mask) and eager (additive float
mask). `enable_shared_prefix(model)` says whether the model has one (the stages fall back to two rows otherwise)
and switches sdpa models to unpadded_attention.py: the model then computes only the real tokens of a batch,
and only attention sees the padded rows.

A batch is a dict of tensors (so DataLoader/accelerate move it to the device as usual):
    input_ids        [rows, L]          rows <= B pairs
    attention_mask   [rows, 1, L, L]    bool, True = may attend
    position_ids     [rows, L]
    last_index       [2B]  flat index (row * L + column) of each side's last token, chosen 1..B then rejected 1..B
    token_slots      [N]   flat index of every real (non-padding) position, in order
and, when response starts are given (DPO), for the N response tokens of all 2B sides:
    label_index      [N]  flat index of the token to predict
    predictor_index  [N]  flat index of the hidden state that predicts it (the previous token OF THAT SIDE)
    label_side       [N]  which side (0..2B-1, same order as last_index) the token belongs to
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix, capped so that each side keeps at least one token of its own (its last
    token, where the reward model reads the score, must belong to that side)."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per row: first-fit decreasing into rows of `capacity` (the longest item, so no row grows and
    the padding of short items fills with whole other items instead)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_shared_prefix(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    response_starts: Sequence[tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """(chosen ids, rejected ids) pairs -> a batch of packed rows; see the module docstring for layout and keys.

    response_starts[i] = (first response token of chosen, of rejected) in each side's own sequence; with them the
    batch also holds the label/predictor gather indices for response log-probs.
    """
    layouts = []
    for chosen, rejected in pairs:
        shared = common_prefix_length(chosen, rejected)
        layouts.append((shared, len(chosen) - shared, len(rejected) - shared))
    lengths = [s + c + k for s, c, k in layouts]
    rows = pack_first_fit(lengths, max(lengths))
    width, batch = max(lengths), len(pairs)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), 3, dtype=torch.long)  # 0 prefix, 1 chosen, 2 rejected, 3 padding
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # which pair a position belongs to
    last_index = [0] * (2 * batch)
    label_index, predictor_index, label_side = [], [], []
    for row, members in enumerate(rows):
        col = 0  # where the next pair starts in this row
        for i in members:
            (chosen, rejected), (s, c, k) = pairs[i], layouts[i]
            end = col + s + c + k
            input_ids[row, col : col + s + c] = torch.as_tensor(chosen, dtype=torch.long)
            input_ids[row, col + s + c : end] = torch.as_tensor(rejected[s:], dtype=torch.long)
            position_ids[row, col : col + s + c] = torch.arange(s + c)
            position_ids[row, col + s + c : end] = torch.arange(s, s + k)
            segment[row, col : col + s], segment[row, col + s : col + s + c], segment[row, col + s + c : end] = 0, 1, 2
            owner[row, col:end] = i
            base = row * width + col  # flat index of the pair's first token
            last_index[i] = base + s + c - 1
            last_index[batch + i] = base + s + c + k - 1
            if response_starts is not None:
                # flat index of token j of a side's own sequence: the shared prefix, then that side's own block
                for side, (offset, length, first) in enumerate(
                    ((s, c, response_starts[i][0]), (s + c, k, response_starts[i][1]))
                ):
                    flat = lambda j, base=base, offset=offset, s=s: base + (j if j < s else offset + (j - s))  # noqa: E731
                    for j in range(max(first, 1), s + length):
                        label_index.append(flat(j))
                        predictor_index.append(flat(j - 1))
                        label_side.append(i + side * batch)
            col = end

    q_segment, k_segment = segment.unsqueeze(2), segment.unsqueeze(1)  # [rows, L, 1], [rows, 1, L]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_pair = owner.unsqueeze(2) == owner.unsqueeze(1)
    same_or_prefix = (k_segment == 0) | (k_segment == q_segment)
    mask = causal & same_pair & same_or_prefix & (q_segment != 3)
    mask |= torch.eye(width, dtype=torch.bool) & (q_segment == 3)  # padding attends to itself only
    out = {
        "input_ids": input_ids,
        "attention_mask": mask.unsqueeze(1),
        "position_ids": position_ids,
        "last_index": torch.tensor(last_index, dtype=torch.long),
        "token_slots": (segment.reshape(-1) != 3).nonzero().squeeze(1),
    }
    if response_starts is not None:
        out.update(
            label_index=torch.tensor(label_index, dtype=torch.long),
            predictor_index=torch.tensor(predictor_index, dtype=torch.long),
            label_side=torch.tensor(label_side, dtype=torch.long),
        )
    return out


def is_shared_prefix_batch(batch: dict) -> bool:
    return "last_index" in batch
