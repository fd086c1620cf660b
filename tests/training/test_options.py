"""Each training stage composes only the options it reads."""

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
    assert LOOP_ONLY == {"max_steps", "num_epochs", "logging_steps", "max_eval_samples",
                         "gradient_accumulation_steps"}
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
