"""Kubeflow component: compare the SFT model and the aligned policy (`rlhf evaluate`)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.images import stage_image


@dsl.component(base_image=stage_image("evaluate"), install_kfp_package=False)
def evaluate(
    data: Input[Dataset],
    sft_model: Input[Model],
    reward_model: Input[Model],
    policy: Input[Model],
    alignment: str,
    config: dict,
    metrics: Output[Metrics],
    report: Output[Markdown],
    generations: Output[Dataset],
    tracking_uri: str = "",
    experiment_name: str = "rlhf-pipeline",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    work_root: str = "",
    judge_model: Input[Model] | None = None,
    second_policy: Input[Model] | None = None,
    second_alignment: str = "",
):
    """Generate answers to held-out <data>/evaluation.parquet questions with SFT and the policies, score them with
    the proxy reward model and the judge (reward, win-rate vs SFT with its interval, KL to SFT, best-of-n,
    the KL frontier), tag each policy's registered version with the gate values `rlhf promote` reads, and name
    the challenger (the report's `challenger_uri` metadata).

    Args:
        policy: The aligned policy (PPO or DPO step's model).
        alignment: ppo or dpo (which step produced the policy).
        judge_model: The judge step's model (a reward model trained on the judge subset).
        second_policy: `alignment: both`: the other policy (DPO next to PPO), evaluated side by side.
        second_alignment: Its name (dpo).
        config: Extra `EvaluateConfig` fields (questions, generation length, ...).
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        kfp_run_id: Kubeflow run id, recorded as a lineage tag and naming the work directory.
        work_root: Where stage outputs go; empty: $RLHF_CACHE_DIR/runs.
    """
    import shutil
    from pathlib import Path

    from rlhf_pipeline.evaluation.evaluate import EvaluateConfig, run_evaluate
    from rlhf_pipeline.orchestration import steps

    out = steps.work_dir(work_root, kfp_run_id, "evaluate")
    cfg = steps.build_config(
        EvaluateConfig,
        config,
        **steps.evaluate_wiring(
            EvaluateConfig,
            data=data,
            sft_model=sft_model,
            reward_model=reward_model,
            policy=policy,
            alignment=alignment,
            output=out,
            judge_model=judge_model,
            second_policy=second_policy,
            second_alignment=second_alignment,
        ),
        **steps.tracking_values(tracking_uri, experiment_name, registered_model_prefix, kfp_run_id),
    )
    result = run_evaluate(cfg)
    values = steps.namespaced("evaluate", steps.flat_metrics(result))
    steps.log_kfp_metrics(metrics, values)
    Path(generations.path).mkdir(parents=True, exist_ok=True)
    for name in ("generations.jsonl", "frontier.png"):  # the frontier: for the report, which embeds it
        if (out / name).is_file():
            shutil.copy2(out / name, Path(generations.path) / name)
    generations.metadata["output_dir"] = str(out)
    for key in ("challenger", "challenger_uri"):
        if result.metrics.get(key):
            report.metadata[key] = result.metrics[key]
    report_md = out / "report.md"
    Path(report.path).write_text(
        report_md.read_text(encoding="utf-8") if report_md.is_file() else "(the evaluation stage wrote no report.md)\n",
        encoding="utf-8",
    )
