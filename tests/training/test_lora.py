"""LoRA plumbing: trainable weights in fp32 on a bf16 base, and the CPU FastDropout."""

from __future__ import annotations

import pytest
import torch

from rlhf_pipeline.cpu.fast_dropout import FastDropout
from rlhf_pipeline.modeling.lora import apply_lora
from rlhf_pipeline.training.options import LoRAOptions, TrainingOptions


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_keeps_the_right_share_and_the_expectation(p):
    torch.manual_seed(0)
    dropout = FastDropout(p).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.003  # 1M draws: standard error <= 0.0005
    assert abs(dropout.threshold / 32768 - (1 - p)) <= 2**-16  # the rounded keep probability
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and len(values) == 2 and values[1] == pytest.approx(32768 / dropout.threshold)
    assert abs(y.mean().item() - 1.0) < 0.005  # unbiased: kept values scaled by 1 / keep
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * dropout.scale)  # gradient flows through kept entries only


def test_fast_dropout_is_identity_in_eval_and_at_p0_and_differs_between_calls():
    x = torch.randn(64, 32)
    assert FastDropout(0.1).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    dropout = FastDropout(0.3).train()
    assert not torch.equal(dropout(x) != 0, dropout(x) != 0)


def test_apply_lora_on_a_bf16_cpu_base(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.bfloat16)
    cfg = LoRAOptions(lora_r=4, lora_dropout=0.1)
    model = apply_lora(base, cfg, "SEQ_CLS")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # LoRA AND the score head
    assert any("score" in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not p.requires_grad)
    layers = base.config.num_hidden_layers
    assert not any(isinstance(m, FastDropout) for m in model.modules())  # the CPU kernels are opt-in
    from rlhf_pipeline.cpu import speed_up

    assert speed_up(model, "eager")["fast_dropout"] == 2 * layers  # q_proj and v_proj
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 2 * layers
    assert all(isinstance(m, torch.nn.Dropout) for m in model.modules() if isinstance(m, FastDropout))


def test_lora_outputs_under_autocast_do_not_depend_on_the_input_cast(tiny_model_dir):
    """With --mixed-precision the LoRA layers skip peft's input cast (autocast re-casts anyway): same outputs."""
    from transformers import AutoModelForCausalLM

    outputs = []
    for mixed in ("no", "bf16"):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        cfg = TrainingOptions(data="x", output="x", lora_r=4, mixed_precision=mixed)
        model = apply_lora(base, cfg, "CAUSAL_LM").eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        casting = [m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert casting and all(casting) == (mixed == "no")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(model(input_ids=torch.arange(5, 37).view(2, 16)).logits.float())
    assert torch.equal(outputs[0], outputs[1])
