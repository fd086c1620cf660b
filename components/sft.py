"""Kubeflow component: supervised fine-tuning with LoRA (`rlhf sft`, step 1)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import stage_image


@dsl.component(base_image=stage_image("sft"), install_kfp_package=False)
def sft(
    data: Input[Dataset],
    base_model: str,
    config: dict,
    model: Output[Model],
    metrics: Output[Metrics],
    tracking_uri: str = "",
    experiment_name: str = "rlhf-pipeline",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    work_root: str = "",
):
    """Fine-tune `base_model` on <data>/finetune.parquet; the model artifact holds the LoRA adapter, its
    metadata `output_dir` the full output (merged model) on the model cache.

    Args:
        base_model: Hugging Face id, a path on the model cache, or the embedded SmolLM2.
        config: Extra `SFTConfig` fields (steps, sequence length, LoRA, optimizer, ...).
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        kfp_run_id: Kubeflow run id, recorded as a lineage tag and naming the work directory.
        work_root: Where stage outputs go; empty: $RLHF_CACHE_DIR/runs.
    """
    from rlhf_pipeline.orchestration import steps

    steps.run_training_step(
        "sft",
        config,
        model,
        metrics,
        data=steps.stage_dir(data),
        model=base_model,
        work_root=work_root,
        kfp_run_id=kfp_run_id,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        registered_model_prefix=registered_model_prefix,
    )
