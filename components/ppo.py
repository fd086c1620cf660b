"""Kubeflow component: PPO against the reward model with a KL penalty (`rlhf ppo`, step 3)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import stage_image


@dsl.component(base_image=stage_image("ppo"), install_kfp_package=False)
def ppo(
    data: Input[Dataset],
    sft_model: Input[Model],
    reward_model: Input[Model],
    config: dict,
    model: Output[Model],
    metrics: Output[Metrics],
    tracking_uri: str = "",
    experiment_name: str = "rlhf-pipeline",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    work_root: str = "",
):
    """Optimize the SFT policy on <data>/rl.parquet questions against the reward model (PPO, KL to SFT).

    Args:
        sft_model: The SFT step's model (policy and reference start from its merged weights).
        reward_model: The reward step's model (its output dir, with reward mean/std for normalization).
        config: Extra `PPOConfig` fields (prompts, steps, generation length, KL coefficient, ...).
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        kfp_run_id: Kubeflow run id, recorded as a lineage tag and naming the work directory.
        work_root: Where stage outputs go; empty: $RLHF_CACHE_DIR/runs.
    """
    from rlhf_pipeline.orchestration import steps

    steps.run_training_step(
        "ppo",
        config,
        model,
        metrics,
        data=steps.stage_dir(data),
        model=steps.merged_model(sft_model),
        reward_model=str(steps.stage_dir(reward_model)),
        work_root=work_root,
        kfp_run_id=kfp_run_id,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        registered_model_prefix=registered_model_prefix,
    )
