"""A stand-in for bitsandbytes' 4-bit quantizer, which needs CUDA: the tests of OUR k-bit code path (which dtype
each parameter group keeps, the lineage-based base sharing) run on a CPU against it."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class StubLinear4bit(nn.Linear):
    """A decoder linear as bitsandbytes leaves it, as far as our code and peft can see: its `weight` a frozen
    uint8 tensor (Params4bit holds packed uint8), the model flagged `is_loaded_in_4bit`. The forward uses the
    original weights (kept as a buffer in the compute dtype), so the stub computes what the unquantized layer does."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.register_buffer("dequantized", linear.weight.detach().clone(), persistent=False)
        packed = torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized.to(x.dtype), None if self.bias is None else self.bias)


def stub_quantize_4bit(model: nn.Module) -> nn.Module:
    """Replace every decoder-layer linear (what bitsandbytes quantizes; not the LM / score head) by StubLinear4bit."""
    for layer in model.base_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, StubLinear4bit(child))
    model.is_loaded_in_4bit = True
    return model


@pytest.fixture()
def quantize_4bit():
    return stub_quantize_4bit
