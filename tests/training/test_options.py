"""Each training stage composes only the options it reads, and fp16 never trains without a gradient scaler."""

from __future__ import annotations

import pytest

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.training.dpo import DPOConfig
from rlhf_pipeline.training.options import LoopOptions, TrainingOptions
from rlhf_pipeline.training.reward import RewardConfig
from rlhf_pipeline.training.sft import SFTConfig

LOOP_ONLY = set(LoopOptions.model_fields) - set(TrainingOptions.model_fields)
PATHS = {"data": "d", "output": "o"}


def test_loop_options_are_sft_reward_and_dpo_only():
    assert LOOP_ONLY == {"max_steps", "num_epochs", "logging_steps", "max_eval_samples", "gradient_accumulation_steps"}
    for cls in (SFTConfig, RewardConfig, DPOConfig):
        assert LOOP_ONLY <= set(cls.model_fields), cls.__name__
    assert not LOOP_ONLY & set(PPOConfig.model_fields)


@pytest.mark.parametrize("field", sorted(LOOP_ONLY))
def test_ppo_refuses_the_loop_options_it_would_ignore(field):
    with pytest.raises(UserError) as err:
        PPOConfig.load(None, {**PATHS, field: 3})
    assert str(err.value) == f"unknown option --{field.replace('_', '-')}"


def test_rlhf_ppo_max_steps_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ppo", "--data", "d", "--output", "o", "--max-steps", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "--max-steps" in err


def test_a_ppo_recipe_with_a_loop_option_is_refused(tmp_path):
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text("data: d\noutput: o\ngradient_accumulation_steps: 1\n")
    with pytest.raises(UserError, match=r"^unknown option gradient_accumulation_steps \(from .*ppo\.yaml\)$"):
        PPOConfig.load(recipe)


@pytest.mark.parametrize("cls", [SFTConfig, RewardConfig, DPOConfig])
@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_fp16_weights_need_fp16_mixed_precision(cls, mixed):
    with pytest.raises(UserError) as err:
        cls.load(None, {**PATHS, "precision": "fp16", "mixed_precision": mixed})
    assert str(err.value) == (
        f"invalid options: precision fp16 with mixed_precision {mixed} trains without a "
        "gradient scaler: use precision bf16 or fp32, or mixed_precision fp16 (GPU only)"
    )
    cls.load(None, {**PATHS, "precision": "fp16", "mixed_precision": "fp16"})  # accelerate scales the loss


@pytest.mark.parametrize(
    "values", [{"precision": "fp16"}, {"mixed_precision": "fp16"}, {"precision": "fp16", "mixed_precision": "fp16"}]
)
def test_ppo_refuses_fp16_altogether(values):
    with pytest.raises(UserError) as err:
        PPOConfig.load(None, {**PATHS, **values})
    assert str(err.value) == (
        "invalid options: PPO's update has no gradient scaler, so it cannot train in fp16 "
        "(precision or mixed_precision): use bf16 or fp32"
    )


def test_bf16_and_scoring_in_fp16_stay_allowed():
    PPOConfig.load(None, {**PATHS, "precision": "bf16", "mixed_precision": "bf16"})
    SFTConfig.load(None, {**PATHS, "mixed_precision": "bf16"})
    RewardConfig.load(None, {**PATHS, "precision": "fp16", "evaluate_only": True})  # no gradients to scale


def test_fp16_mixed_precision_without_a_scaler_is_refused_at_run_time():
    """On a CPU accelerate neither autocasts fp16 nor creates a GradScaler: refused before any model loads."""
    import torch
    from accelerate.state import AcceleratorState

    from rlhf_pipeline.training.loop import build_accelerator

    if torch.cuda.is_available():
        pytest.skip("a GPU gets a GradScaler")
    cfg = SFTConfig.load(None, {**PATHS, "mixed_precision": "fp16"})
    AcceleratorState._reset_state(True)
    try:
        with pytest.raises(UserError, match="^--mixed-precision fp16 needs a gradient scaler, .* runs on cpu"):
            build_accelerator(cfg)
    finally:
        AcceleratorState._reset_state(True)
