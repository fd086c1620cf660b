"""Kubeflow component: `rlhf prepare-data` (Stack Exchange dump -> scored preference pairs)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import stage_image


@dsl.component(base_image=stage_image("prepare_data"), install_kfp_package=False)
def prepare_data(
    input_data: str,
    config: dict,
    data: Output[Dataset],
    metrics: Output[Metrics],
):
    """Stream the dump at `input_data` into {finetune,reward,rl,evaluation}.parquet and stats.json.

    Args:
        input_data: Posts.xml, a site .7z, H4 preference parquet/JSONL, or a directory of them (a path the pod
            sees, e.g. on the model-cache PVC).
        config: Extra `PrepareDataConfig` fields (subset fractions and caps, seed, ...).
    """
    from rlhf_pipeline.data.config import PrepareDataConfig
    from rlhf_pipeline.data.prepare import run_prepare_data
    from rlhf_pipeline.orchestration import steps

    cfg = steps.build_config(PrepareDataConfig, config, input=input_data, output=data.path)
    stats = run_prepare_data(cfg).metrics
    data.metadata["output_dir"] = data.path
    data.metadata["stage"] = "prepare_data"
    data.metadata["input_sha256"] = str(stats.get("input_sha256", ""))
    data.metadata["pairs_per_subset"] = stats.get("pairs_per_subset", {})
    steps.log_kfp_metrics(
        metrics,
        steps.namespaced(
            "prepare_data",
            steps.flat_metrics(
                {
                    "pairs": stats.get("pairs_per_subset", {}),
                    "questions": stats.get("questions_per_subset", {}),
                    "pairs_total": stats.get("pairs_total", 0),
                    "posts_read": stats.get("posts_read", 0),
                }
            ),
        ),
    )
