"""Kubeflow component: the independent judge, a reward model trained on <data>/judge.parquet (`rlhf reward
--subset judge`), registered as <prefix>-judge; the evaluation scores every policy's answers with it."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import stage_image


@dsl.component(base_image=stage_image("reward"), install_kfp_package=False)
def judge(
    data: Input[Dataset],
    sft_model: Input[Model],
    config: dict,
    model: Output[Model],
    metrics: Output[Metrics],
    tracking_uri: str = "",
    experiment_name: str = "rlhf-pipeline",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    work_root: str = "",
):
    """Train the judge on the judge subset's questions (disjoint from the proxy reward model's and PPO's).

    Args:
        sft_model: The SFT step's model: the judge's starting point unless `config` names another `model`.
        config: Extra `RewardConfig` fields (steps, lengths, `model` for another base); `subset` is `judge`.
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        kfp_run_id: Kubeflow run id, recorded as a lineage tag and naming the work directory.
        work_root: Where stage outputs go; empty: $RLHF_CACHE_DIR/runs.
    """
    from rlhf_pipeline.orchestration import steps

    values = {**(config or {}), "subset": "judge"}
    steps.run_training_step(
        "reward",
        values,
        model,
        metrics,
        step_dir="judge",
        data=steps.stage_dir(data),
        model=None if "model" in values else steps.merged_model(sft_model),
        work_root=work_root,
        kfp_run_id=kfp_run_id,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        registered_model_prefix=registered_model_prefix,
    )
