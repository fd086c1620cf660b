"""Reward-model scoring: one scalar per sequence, read at its LAST REAL TOKEN, and the pairwise loss.

Why not `AutoModelForSequenceClassification.forward`: transformers pools at the last token that is not
`pad_token_id`, and older code at the first pad token minus one. Both go wrong when pad == eos (SmolLM2: both
are `<|im_end|>`): our sequences END with a real EOS, which those rules mistake for padding, so the score would be
read one token early (and the first-pad rule reads position -1 under left padding). Here the index comes from the
attention mask alone, and position ids are derived from it, so right- and left-padded batches give the same
scores as unpadded sequences. The head is applied to the pooled hidden states only (no logits for padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_pipeline.training.lora import transformer_parts
from rlhf_pipeline.training.shared_prefix import collate_shared_prefix, shared_prefix_hidden
from rlhf_pipeline.training.value_head import position_ids_from_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask == 1 in each row (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] fp32 rewards of a (peft-wrapped or plain) one-logit sequence-classification model."""
    backbone, score_head = transformer_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    pooled = hidden[rows, last_token_index(attention_mask)]
    return _score(score_head, pooled)


def _score(score_head: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [N] fp32; the head may be fp32 (trained) on a bf16 backbone."""
    return score_head(pooled.to(next(score_head.parameters()).dtype)).squeeze(-1).float()


def shared_prefix_rewards(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[2B] fp32 rewards (chosen 1..B, rejected 1..B) of a shared-prefix pair batch (see shared_prefix.py)."""
    backbone, score_head = transformer_parts(model)
    hidden = shared_prefix_hidden(backbone, batch)
    return _score(score_head, hidden[batch["last_index"]])


class RewardScorer(torch.nn.Module):
    """forward(batch) -> [rows] rewards: padded sequences, or a shared-prefix pair batch ([2B], chosen first).

    A module, so accelerate/DDP can wrap the scoring.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the PeftModel (saved and merged by the stage)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **shared_prefix) -> torch.Tensor:
        if shared_prefix:
            return shared_prefix_rewards(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                                      **shared_prefix})
        return sequence_rewards(self.model, input_ids, attention_mask)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r_chosen - r_rejected) (InstructGPT / StackLLaMA)."""
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly; a tie counts as wrong."""
    return float((chosen > rejected).float().mean())


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_token_id: int,
                  shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One batch scoring both sides in a single forward: B shared-prefix rows (see shared_prefix.py), or 2B
    right-padded sequences, chosen first then rejected. Either way the model returns [chosen..., rejected...]."""
    if shared_prefix:
        return collate_shared_prefix(pairs, pad_token_id)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def split_chosen_rejected(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]
