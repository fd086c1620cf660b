"""The reward model as a module (what DDP wraps) and its Bradley-Terry loss. The score of a sequence is read at
its last real token (modeling/forward.py says why not by AutoModelForSequenceClassification.forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_pipeline.modeling.forward import sequence_rewards, shared_prefix_rewards


class RewardScorer(torch.nn.Module):
    """forward(batch) -> [rows] rewards: padded sequences, or a shared-prefix pair batch ([2B], chosen first).

    A module, so accelerate/DDP can wrap the scoring.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the PeftModel (saved and merged by the stage)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **shared_prefix) -> torch.Tensor:
        if shared_prefix:
            return shared_prefix_rewards(
                self.model, {"input_ids": input_ids, "attention_mask": attention_mask, **shared_prefix}
            )
        return sequence_rewards(self.model, input_ids, attention_mask)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r_chosen - r_rejected) (InstructGPT / StackLLaMA)."""
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly; a tie counts as wrong."""
    return float((chosen > rejected).float().mean())
