"""Kubeflow component: the run's first step. Builds every stage's config from the run's parameters (the typed ones
laid over the `<stage>_config` blobs) and hands each step its options, so a bad key fails here in seconds, with one
line, before prepare-data or any training step starts (they all take their options from this step's outputs)."""

from typing import NamedTuple

from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("ops"), install_kfp_package=False)
def validate_config(
    alignment: str,
    prepare_data_config: dict,
    sft_config: dict,
    reward_config: dict,
    judge_config: dict,
    ppo_config: dict,
    dpo_config: dict,
    evaluate_config: dict,
    sft_max_steps: int,
    sft_seq_length: int,
    reward_max_steps: int,
    judge_max_steps: int,
    ppo_steps: int,
    ppo_batch_size: int,
    dpo_max_steps: int,
    evaluate_max_questions: int,
    mlflow_tracking_uri: str,
) -> NamedTuple(
    "StageOptions",
    [
        ("prepare_data_config", dict),
        ("sft_config", dict),
        ("reward_config", dict),
        ("judge_config", dict),
        ("ppo_config", dict),
        ("dpo_config", dict),
        ("evaluate_config", dict),
        ("tracking_uri", str),
    ],
):
    """Check every stage's options; output them, merged, for the steps.

    Args:
        mlflow_tracking_uri: The pipeline parameter; its default `$MLFLOW_TRACKING_URI` becomes "" (the steps then
            read that variable themselves, so its value never shows in the UI).
    """
    from collections import namedtuple

    from rlhf_pipeline.errors import UserError
    from rlhf_pipeline.orchestration.stage_parameters import FROM_ENVIRONMENT, SECTIONS, validated_options

    arguments = dict(
        alignment=alignment,
        prepare_data_config=prepare_data_config,
        sft_config=sft_config,
        reward_config=reward_config,
        judge_config=judge_config,
        ppo_config=ppo_config,
        dpo_config=dpo_config,
        evaluate_config=evaluate_config,
        sft_max_steps=sft_max_steps,
        sft_seq_length=sft_seq_length,
        reward_max_steps=reward_max_steps,
        judge_max_steps=judge_max_steps,
        ppo_steps=ppo_steps,
        ppo_batch_size=ppo_batch_size,
        dpo_max_steps=dpo_max_steps,
        evaluate_max_questions=evaluate_max_questions,
    )
    try:
        options = validated_options(arguments)
    except UserError as exc:
        raise SystemExit(f"invalid pipeline parameters: {exc}") from None  # one line, no traceback
    outputs = namedtuple("StageOptions", [f"{s}_config" for s in SECTIONS] + ["tracking_uri"])
    uri = "" if mlflow_tracking_uri == FROM_ENVIRONMENT else mlflow_tracking_uri
    return outputs(*(options[s] for s in SECTIONS), uri)
