"""Row-split frozen matmuls: the same numbers (and gradients) as torch's matmuls, and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.cpu import row_split_matmul as rsm

pytestmark = pytest.mark.skipif(rsm.extension() is None, reason="the C++ extension cannot be built here")


@pytest.fixture()
def split_everything(monkeypatch):
    """Split even the tiny test matmuls, across 2 threads (restored afterwards)."""
    monkeypatch.setattr(rsm, "MIN_ROWS_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _error(result: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return (result.double() - a.double() @ b.double()).abs().max().item()


@pytest.mark.parametrize("rows", [37, 3, 2])  # uneven chunks, one row per chunk, fewer rows than chunks
def test_row_split_mm_equals_mm(rows):
    torch.manual_seed(0)
    a, w = torch.randn(rows, 40), torch.randn(24, 40)
    # forward's transposed weight view; backward's plain weight (with a strided left operand)
    for left, right in ((a, w.t()), (a[:, :24], w[:, :24].contiguous())):
        torch.testing.assert_close(rsm.extension().row_split_mm(left, right, 3), left @ right)
    # bf16: each output row is an ordinary bf16 GEMM row, as accurate as torch's own call (fp32 accumulation)
    a16, b16 = a.bfloat16(), w.t().bfloat16()
    ours = rsm.extension().row_split_mm(a16, b16, 3)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 24)
    assert _error(ours, a16, b16) <= 2 * _error(a16 @ b16, a16, b16) + 1e-6


def test_row_split_mm_keeps_small_or_single_thread_matmuls_whole(monkeypatch):
    calls = []
    monkeypatch.setattr(rsm, "extension", lambda: type("Ext", (), {"row_split_mm": lambda *a: calls.append(a)}))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rsm.row_split_mm(torch.ones(2 * rsm.MIN_ROWS_PER_THREAD - 1, 4), torch.ones(4, 3))
        assert calls == []
        rsm.row_split_mm(torch.ones(2 * rsm.MIN_ROWS_PER_THREAD, 4), torch.ones(4, 3))
        assert len(calls) == 1 and calls[0][2] == 2
        torch.set_num_threads(1)
        rsm.row_split_mm(torch.ones(4 * rsm.MIN_ROWS_PER_THREAD, 4), torch.ones(4, 3))
        assert len(calls) == 1
    finally:
        torch.set_num_threads(threads)


def _lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that LoRA contributes and A gets gradients too
            torch.nn.init.normal_(param, std=0.1)
    return model


def test_split_model_equals_torch_model_in_outputs_and_gradients(tiny_model_dir, split_everything):
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7], [4, 4, 8, 15, 16, 23]])
    results = []
    for split in (False, True):
        model = _lora_model(tiny_model_dir)
        if split:
            linears = sum(type(m) is torch.nn.Linear for m in model.modules())
            assert rsm.split_frozen_linears(model) == linears
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach().float(), grads, model.state_dict().keys()))
    (torch_logits, torch_grads, torch_keys), (logits, grads, keys) = results
    # bf16 GEMMs with another row blocking may differ in the last bit: allow 1 % of each tensor's scale
    # (an input gradient 1 % off moves these LoRA gradients by 3-9 % of their scale)
    assert (logits - torch_logits).abs().max() <= 1e-2 * torch_logits.abs().max()
    assert grads.keys() == torch_grads.keys() and len(grads) == 4 * 2  # A and B of q_proj, v_proj in 2 layers
    for name, grad in torch_grads.items():
        assert grad.abs().max() > 0, name
        assert (grads[name] - grad).abs().max() <= 1e-2 * grad.abs().max(), name
    assert keys == torch_keys  # saved exactly as before


def test_trainable_or_fp32_linears_keep_torch_linear(split_everything):
    torch.manual_seed(0)
    trainable = torch.nn.Linear(8, 3, bias=False).bfloat16()
    reference = torch.nn.Linear(8, 3, bias=False).bfloat16()
    reference.load_state_dict(trainable.state_dict())
    assert rsm.split_frozen_linears(trainable) == 1
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    trainable(x).float().sum().backward()
    reference(x).float().sum().backward()
    assert torch.equal(trainable.weight.grad, reference.weight.grad)  # the weight gradient still flows
    fp32 = torch.nn.Linear(8, 3, bias=False).requires_grad_(False)
    rsm.split_frozen_linears(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 input, fp32 weight: autocast's F.linear as before
        out = fp32(torch.randn(5, 8))
    assert out.dtype == torch.bfloat16


def test_without_the_extension_the_model_keeps_torch_matmuls(monkeypatch, capsys):
    import torch.utils.cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required\nmore")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fail)
    rsm.extension.cache_clear()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        forward = model[0].forward
        assert rsm.split_frozen_linears(model) == 0
        assert model[0].forward == forward
    finally:
        rsm.extension.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["row-split matmul unavailable, using torch's (RuntimeError: Ninja is required)"]
