"""Non-finite losses in the shared training loop (SFT, reward, DPO): a step whose loss is NaN/inf is skipped (no
optimizer update: the weights stay bit-identical), counted, and more than MAX_NONFINITE_STEPS of them fail the
stage with one line (exit 3) before anything is saved or registered."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from faults import row

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.training import loop
from rlhf_pipeline.training.checkpoint import latest_checkpoint


def setup(tmp_path, bad_steps: set[int], total: int = 6):
    cfg = SimpleNamespace(
        output=str(tmp_path),
        seed=0,
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=100,
        keep_checkpoints=2,
        learning_rate=0.1,
        weight_decay=0.0,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        num_threads=1,
        mixed_precision="no",
        lora_r=1,
        data=None,
    )
    cfg.to_flat_dict = lambda: {k: v for k, v in vars(cfg).items() if not callable(v)}
    accelerator = loop.build_accelerator(cfg)
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    optimizer = loop.build_optimizer(module.parameters(), cfg)
    scheduler = loop.build_scheduler(optimizer, cfg, total)
    weights_after: dict[int, torch.Tensor] = {}
    calls = {"step": 0}

    def loss_fn(mod, batch):
        calls["step"] += 1
        loss = mod(batch).pow(2).mean()
        if calls["step"] in bad_steps:
            loss = loss * float("nan")
        return loss, {}, 1.0

    def on_step(step):
        weights_after[step] = module.weight.detach().clone()

    batches = iter([torch.ones(2, 3)] * 100)
    run = lambda: loop.train_loop(  # noqa: E731
        accelerator,
        module,
        optimizer,
        scheduler,
        batches,
        loss_fn,
        cfg=cfg,
        total_steps=total,
        prefix="sft",
        on_step=on_step,
    )
    return run, weights_after


@row(
    "sft/reward/dpo",
    "one step's loss is NaN",
    "0",
    r"step 3: loss or gradient not finite, update skipped",
    "the step applied no update (weights bit-identical); counted in <prefix>/skipped_steps",
)
def test_a_nan_step_is_skipped_and_leaves_the_weights_untouched(tmp_path, capsys):
    run, weights = setup(tmp_path, bad_steps={3})
    result = run()
    assert result.steps == 6
    assert torch.equal(weights[2], weights[3])  # step 3 applied no update
    assert not torch.equal(weights[3], weights[4])  # the next finite step did
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert "step 3: loss or gradient not finite, update skipped (1 so far)" in capsys.readouterr().err
    assert result.last_metrics["sft/skipped_steps"] == 1.0
    assert result.train_loss is not None and result.train_loss == result.train_loss  # the NaN is not averaged in


@row(
    "sft/reward/dpo",
    "more NaN steps than MAX_NONFINITE_STEPS (3)",
    "3",
    r"loss or gradient not finite in 4 steps \(last: step 5\)",
    "no checkpoint of the diverged steps, no model",
)
def test_more_nan_steps_than_the_bound_fail_with_one_line_and_save_nothing(tmp_path):
    run, weights = setup(tmp_path, bad_steps={2, 3, 4, 5, 6})
    with pytest.raises(UserError, match=r"sft: loss or gradient not finite in 4 steps \(last: step 5\)") as exc:
        run()
    assert exc.value.exit_code == 3
    assert loop.MAX_NONFINITE_STEPS == 3 and max(weights) == 4  # failed inside step 5, before its checkpoint
    assert latest_checkpoint(tmp_path) is None
