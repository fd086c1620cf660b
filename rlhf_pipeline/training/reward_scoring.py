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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with attention_mask == 1 in each row (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever padding precedes them (padding gets 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch] fp32 rewards of a (peft-wrapped or plain) one-logit sequence-classification model."""
    backbone, score_head = transformer_parts(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    pooled = hidden[rows, last_token_index(attention_mask)]
    return score_head(pooled).squeeze(-1).float()


class RewardScorer(torch.nn.Module):
    """forward(input_ids, attention_mask) -> [batch] rewards. A module, so accelerate/DDP can wrap the scoring."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the PeftModel (saved and merged by the stage)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r_chosen - r_rejected) (InstructGPT / StackLLaMA)."""
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly; a tie counts as wrong."""
    return float((chosen > rejected).float().mean())


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences, chosen first then rejected: a single forward scores both sides."""
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
