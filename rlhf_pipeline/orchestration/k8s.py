"""Apply `PipelineSettings` to pipeline tasks with kfp-kubernetes: GPU node pool, resources, retries, caching,
the model-cache PVC, plain env and secret env, and the pod security settings. Used by pipelines/rlhf_pipeline.py
at compile time.

Pod security ("restricted" profile, docs/deployment.md "Security"): kfp-kubernetes sets the identity
(`runAsNonRoot`, the images' UID/GID); the KFP backend's compiler adds `allowPrivilegeEscalation: false`,
`capabilities: drop [ALL]` and `seccompProfile: RuntimeDefault` to every container it creates (KFP >= 2.16). The
SDK cannot ask for a read-only root filesystem; the paths a step writes get emptyDirs all the same, so a
cluster-side policy that enforces one does not break the steps.
"""

from __future__ import annotations

from typing import Any

from kfp import kubernetes

from rlhf_pipeline.orchestration.settings import PipelineSettings, training_steps

# The images' non-root user (images/bases.env RLHF_UID, the chart's pod security context).
IMAGE_UID = 10001
# What a step writes outside the model-cache PVC: temp files, and the local copies the KFP launcher keeps of
# artifacts under /<scheme>/<bucket>/... of the pipeline root (minio://, s3://, gs://).
WRITABLE_DIRS = {"tmp": "/tmp", "kfp-local-minio": "/minio", "kfp-local-s3": "/s3", "kfp-local-gcs": "/gcs"}


def restrict_pod(task: Any) -> Any:
    """What the SDK can set of the "restricted" profile: the non-root identity, and emptyDirs where it writes.
    Every task of the pipeline gets it (configure_task, and the tasks that need no other settings)."""
    kubernetes.set_security_context(task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True)
    for volume, path in WRITABLE_DIRS.items():
        kubernetes.empty_dir_mount(task, volume_name=volume, mount_path=path)
    return task


def configure_task(
    task: Any,
    step: str,
    display_name: str,
    settings: PipelineSettings,
    *,
    gpu_node_selector: Any = None,
    gpu_tolerations: Any = None,
    gpu: bool | None = None,
) -> Any:
    """Set display name, caching, resources, GPU scheduling, retries, PVC, env and secrets of one task.

    `step` names the settings entry (a registry stage's key, or `report`); `gpu_node_selector` / `gpu_tolerations`
    are the pipeline parameters (resolved by Kubeflow at run time). `gpu=False` forces a CPU pod (TrainJob launchers).
    """
    task.set_display_name(display_name)
    task.set_caching_options(settings.caching.get(step, False))

    on_gpu = (step in settings.gpu.steps and settings.gpu.accelerator_count > 0) if gpu is None else gpu
    # training stages get the training resources even on CPU-only settings; a TrainJob launcher (gpu=False) is light
    heavy = on_gpu or (step in training_steps() and gpu is None)
    res = settings.training_resources if heavy else settings.light_resources
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)

    if on_gpu:
        task.set_accelerator_type(settings.gpu.accelerator_type)
        task.set_accelerator_limit(settings.gpu.accelerator_count)
        if gpu_node_selector is not None:
            kubernetes.add_node_selector_json(task, gpu_node_selector)
        if gpu_tolerations is not None:
            kubernetes.add_toleration_json(task, gpu_tolerations)

    if step in settings.retry.steps:
        r = settings.retry
        task.set_retry(
            num_retries=r.num_retries,
            backoff_duration=r.backoff_duration,
            backoff_factor=r.backoff_factor,
            backoff_max_duration=r.backoff_max_duration,
        )

    restrict_pod(task)
    kubernetes.mount_pvc(task, pvc_name=settings.model_cache.pvc_name, mount_path=settings.model_cache.mount_path)
    for name, value in {**settings.env, **settings.cache_env()}.items():
        task.set_env_variable(name, value)
    for secret in settings.secrets.values():
        if step in secret.steps:
            kubernetes.use_secret_as_env(
                task, secret_name=secret.name, secret_key_to_env=dict(secret.keys), optional=secret.optional
            )
    return task
