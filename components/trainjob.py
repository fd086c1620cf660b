"""Kubeflow component: launch one training stage as a Kubeflow Trainer TrainJob and wait for it
(`rlhf compile --trainjob`; see rlhf_pipeline/orchestration/trainjob.py)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import image_for


@dsl.component(base_image=image_for("ops"), install_kfp_package=False)
def trainjob(
    stage: str,
    image: str,
    data: Input[Dataset],
    config: dict,
    settings: dict,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    model: Output[Model],
    metrics: Output[Metrics],
    sft_model: Input[Model] | None = None,
    reward_model: Input[Model] | None = None,
    base_model: str = "",
    tracking_uri: str = "",
    experiment_name: str = "rlhf-pipeline",
    registered_model_prefix: str = "rlhf",
    kfp_run_id: str = "",
    work_root: str = "",
):
    """Run `rlhf <stage>` on `settings.trainjob.num_nodes` nodes as a TrainJob; publish its output.

    Args:
        stage: A registry stage that may run as a TrainJob (`Stage.trainjob`: sft, reward, ppo, dpo).
        image: The stage's container image (the TrainJob's trainer image).
        data: Prepared data; copied onto the shared PVC, where the training pods read it.
        config: Extra fields of the stage config.
        settings: The compile-time PipelineSettings (resources, PVC, secrets, TrainJob options).
        gpu_node_selector: Node selector of the training pods.
        gpu_tolerations: Tolerations of the training pods.
    """
    import os
    import shutil

    import yaml

    from rlhf_pipeline.orchestration import steps
    from rlhf_pipeline.orchestration import trainjob as tj

    tj.trainjob_stage(stage)  # fail before anything is copied
    out = steps.work_dir(work_root, kfp_run_id, stage)
    data_dir = out.parent / "data"
    if not (data_dir / "stats.json").is_file():
        shutil.copytree(steps.stage_dir(data), data_dir, dirs_exist_ok=True)
    wired = dict(
        data=str(data_dir),
        output=str(out),
        **steps.tracking_values(tracking_uri, experiment_name, registered_model_prefix, kfp_run_id),
    )
    # Wired from the inputs the pipeline gave, not from the stage's name: a stage after SFT starts from its
    # merged weights, the first one from the base model; fields a config lacks are dropped by build_config.
    wired["model"] = steps.merged_model(sft_model) if sft_model is not None else base_model
    if reward_model is not None:
        wired["reward_model"] = str(steps.stage_dir(reward_model))
    config_cls = steps.stage_config_class(stage)
    cfg = steps.build_config(config_cls, config, **wired)  # validate here, before any pod is scheduled
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False))

    manifest = tj.build_manifest(
        name=tj.trainjob_name(kfp_run_id, stage),
        stage=stage,
        image=image,
        config_path=str(config_path),
        settings=settings,
        node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
        namespace=settings["trainjob"].get("namespace"),
        labels={"pipelines.kubeflow.org/run-id": steps.run_key(kfp_run_id)[:63]},
        run_env=tj.forwarded_env(dict(os.environ)),  # the training pods attach to this task's MLflow run
    )
    problems = tj.validate_manifest(manifest)
    if problems:
        raise RuntimeError("invalid TrainJob manifest: " + "; ".join(problems))
    tj.run_trainjob(
        manifest,
        poll_seconds=settings["trainjob"]["poll_seconds"],
        timeout_s=settings["trainjob"]["timeout_hours"] * 3600,
    )
    steps.publish(stage, out, model, metrics)  # its result: <out>/metrics.json
