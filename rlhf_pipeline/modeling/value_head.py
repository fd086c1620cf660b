"""The critic's head: a linear layer on the policy's last hidden states (shared backbone, as in Ziegler et al. and
StackLLaMA), so one forward gives both the token log-probs and the values."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the last hidden state. Zero-initialized: values start at 0, not at noise."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, trains_backbone: bool = True):
        super().__init__()
        self.trains_backbone = trains_backbone  # False: the value loss reaches this layer only (input detached)
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        if not self.trains_backbone:
            hidden_states = hidden_states.detach()
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)

    def init_from_score_head(self, score_weight: torch.Tensor, score_bias: torch.Tensor | None = None) -> bool:
        """Copy a reward model's score head ([1, H] weight) when shapes match; returns whether it did."""
        if tuple(score_weight.shape) != tuple(self.summary.weight.shape):
            return False
        with torch.no_grad():
            self.summary.weight.copy_(score_weight.to(self.summary.weight.dtype))
            self.summary.bias.copy_(score_bias.reshape(1) if score_bias is not None else torch.zeros(1))
        return True

    def save(self, directory: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(directory) / VALUE_HEAD_FILE))

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(load_file(str(Path(directory) / VALUE_HEAD_FILE)))
