"""Fused CPU kernels (torch.compile'd): the same numbers as the eager modules, and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.cpu import fused_ops
from rlhf_pipeline.cpu.fast_dropout import FastDropout

pytestmark = pytest.mark.skipif(not fused_ops.compiler_available(), reason="torch.compile has no C++ compiler here")


@pytest.fixture(autouse=True)
def _fusion_off_afterwards(monkeypatch):
    monkeypatch.setattr(fused_ops, "_enabled", False)  # restored after each test: other tests stay eager


def test_fused_model_equals_the_eager_model_in_outputs_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fused = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = fused.config.num_hidden_layers
    assert fused_ops.fuse_elementwise(fused) == 2 * layers + 1 + layers  # 2 norms per layer + final, 1 MLP each
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7], [4, 4, 8, 15, 16, 23]])
    outputs = []
    for model in (eager, fused):
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert fused.state_dict().keys() == eager.state_dict().keys()  # saved exactly as before


def test_fused_norm_in_bf16_matches_transformers_within_rounding():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 48, dtype=torch.bfloat16)
    expected = norm(x)
    fused_ops.fuse_elementwise(norm)
    torch.testing.assert_close(norm(x), expected, atol=0, rtol=2**-7)  # at most 1 bf16 ulp apart


def test_fused_dropout_and_softmax_keep_their_semantics():
    fused_ops.fuse_elementwise(torch.nn.Identity())  # switches the shared kernels on
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    assert abs((y != 0).float().mean().item() - 0.9) < 0.003
    assert torch.unique(y).tolist() == [0.0, pytest.approx(dropout.scale)]
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * dropout.scale)

    from rlhf_pipeline.cpu.math_attention import math_attention

    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(math_attention(q, k, v, mask, scaling=8**-0.5), reference)


def test_without_a_compiler_the_model_stays_eager(monkeypatch, capsys):
    monkeypatch.setattr(fused_ops, "_compiled", lambda fn: (_ for _ in ()).throw(RuntimeError("no cc\nmore")))
    fused_ops.compiler_available.cache_clear()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        assert fused_ops.fuse_elementwise(model) == 0
        assert not fused_ops._enabled
    finally:
        fused_ops.compiler_available.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fused kernels unavailable, running eager (RuntimeError: no cc)"]
