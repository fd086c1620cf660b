"""The typed top-level parameters: their defaults are the stage configs' own, which one wins over its blob, and the
check of every stage's options (what the validate-config step and `rlhf submit` run)."""

from __future__ import annotations

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration import stage_parameters as sp
from rlhf_pipeline.orchestration import steps


@pytest.mark.parametrize("param", sp.TYPED_PARAMETERS, ids=lambda p: p.name)
def test_defaults_are_the_stage_configs_defaults(param):
    field = steps.stage_config_class(param.section).model_fields[param.key]
    if param.unset_means:  # the stage default is "none": the parameter's UNSET stands for it
        assert field.default is None and param.default == sp.UNSET
    else:
        assert field.default == param.default


def test_pipeline_signature_declares_every_typed_parameter_with_its_default():
    import inspect

    from pipelines.rlhf_pipeline import build_pipeline

    signature = inspect.signature(build_pipeline(None).pipeline_func).parameters
    for param in sp.TYPED_PARAMETERS:
        assert signature[param.name].annotation is int, param.name
        assert signature[param.name].default == param.default, param.name


def test_the_typed_parameter_wins_over_its_blob_key():
    merged = sp.merge_typed({"sft": {"max_steps": 500, "lora_r": 16}, "ppo": {"steps": 5}}, {"sft_max_steps": 7})
    assert merged["sft"] == {"max_steps": 7, "lora_r": 16}
    assert merged["ppo"] == {"steps": 5}  # no typed value given for it: the blob's stays


def test_unset_typed_parameter_leaves_the_blob_key():
    # sft_max_steps=0 (UNSET): the blob's max_steps, else the stage default (no cap)
    assert sp.merge_typed({"sft": {"max_steps": 500}}, {"sft_max_steps": 0})["sft"] == {"max_steps": 500}
    assert sp.merge_typed({}, {"sft_max_steps": 0})["sft"] == {}
    # a parameter without an unset value always wins, also at its default
    assert sp.merge_typed({"ppo": {"steps": 5}}, {"ppo_steps": 20})["ppo"] == {"steps": 20}


def test_validated_options_applies_defaults_and_builds_every_stage():
    options = sp.validated_options({"ppo_config": {"steps": 5, "mini_batch_size": 4}, "sft_max_steps": 3})
    assert set(options) == set(sp.SECTIONS)
    assert options["sft"] == {"max_steps": 3, "seq_length": 512}
    assert options["ppo"] == {"steps": 20, "batch_size": 8, "mini_batch_size": 4}  # ppo_steps' default wins
    assert options["evaluate"] == {"max_questions": 32}
    assert options["dpo"] == {}  # dpo_max_steps=0: no key, DPOConfig's default


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"sft_config": {"max_seq_length": 1024}}, "sft_config: unknown option max_seq_length (see `rlhf sft --help`"),
        ({"judge_config": {"nope": 1}}, "judge_config: unknown option nope (see `rlhf reward --help`"),
        ({"prepare_data_config": {"seed": None}}, "prepare_data_config: null values are not supported (seed)"),
        ({"ppo_steps": -3}, "ppo_steps: Input should be greater than 0 (got -3)"),
        ({"dpo_config": {"beta": "x"}}, "dpo_config.beta: Input should be a valid number"),
        ({"sft_max_steps": "ten"}, "sft_max_steps: expected an integer"),
        ({"alignment": "rlaif"}, "alignment must be one of ppo, dpo, both"),
    ],
)
def test_bad_options_are_one_line_errors(arguments, message):
    with pytest.raises(UserError) as info:
        sp.validated_options(arguments)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_split_typed_moves_recipe_keys_into_typed_parameters():
    """`rlhf run` passes its recipe sections as blobs: their typed keys become the typed parameters."""
    args = sp.split_typed({"sft_config": {"max_steps": 20, "lora_r": 8}, "ppo_config": {"steps": 5}})
    assert args == {"sft_config": {"lora_r": 8}, "ppo_config": {}, "sft_max_steps": 20, "ppo_steps": 5}
    assert sp.validated_options(args)["sft"]["max_steps"] == 20 and sp.validated_options(args)["ppo"]["steps"] == 5
