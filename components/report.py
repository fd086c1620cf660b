"""Kubeflow component: point the `challenger` alias at the evaluated policy and write the run report."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import image_for


@dsl.component(base_image=image_for("report"), install_kfp_package=False)
def report(
    sft_model: Input[Model],
    reward_model: Input[Model],
    policy: Input[Model],
    eval_metrics: Input[Metrics],
    generations: Input[Dataset],
    eval_report: Input[Markdown],
    alignment: str,
    summary: Output[Metrics],
    report_md: Output[Markdown],
    report_html: Output[HTML],
    tracking_uri: str = "",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    num_samples: int = 4,
    alias: str = "challenger",
    second_policy: Input[Model] | None = None,
):
    """Register the outcome: alias `alias` -> the policy version the evaluation named challenger (with two
    policies, `alignment: both`, the better one by the evaluation's rule), else the policy; a Markdown and an HTML
    report (headline metrics, registered versions with lineage, sample generations), also under `report/` of the
    pipeline's MLflow run when the MLflow plugin injected one; the headline metrics
    (rm/accuracy, eval/reward_mean, eval/kl, eval/win_rate) as this step's Metrics.

    Args:
        alignment: ppo, dpo or both.
        second_policy: `alignment: both`: the DPO step's model next to `policy` (PPO's).
        tracking_uri: MLflow tracking URI; empty: $MLFLOW_TRACKING_URI.
        num_samples: Sample generations shown in the report.
        alias: Alias pointed at the policy version (`rlhf promote` gates it later).
    """
    from rlhf_pipeline.ops.gates import verdict
    from rlhf_pipeline.orchestration import report as rep

    rep.run_report_step(
        models={"sft": sft_model, "reward": reward_model, "policy": policy}
        | ({"second_policy": second_policy} if second_policy is not None else {}),
        eval_metrics=eval_metrics,
        generations=generations,
        eval_report=eval_report,
        alignment=alignment,
        summary=summary,
        report_md=report_md,
        report_html=report_html,
        tracking_uri=tracking_uri,
        registered_model_prefix=registered_model_prefix,
        kfp_run_id=kfp_run_id,
        num_samples=num_samples,
        alias=alias,
        check_gates=verdict,
    )
