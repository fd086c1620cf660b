"""Beyond one node: run a training stage as a Kubeflow Trainer `TrainJob` (trainer.kubeflow.org/v1alpha1).

With `rlhf compile --trainjob` (settings `distributed: trainjob`) each training step of the pipeline is a small
CPU *launcher* pod instead of the training pod. The launcher

1. copies its input data onto the shared model-cache PVC and writes the stage config there (`config.yaml`),
2. creates a TrainJob referencing the `torch-distributed` runtime whose trainer runs
   `torchrun --no-python rlhf <stage> --config <config.yaml>` on `num_nodes` nodes (torchrun takes the rendezvous
   from the `PET_*` variables the runtime sets; the stages' accelerate loop then runs data-parallel),
3. waits for it (re-attaching to an existing TrainJob of the same name after a launcher retry), and
4. publishes the stage output from the PVC like the in-pod components do.

The training pods mount the same PVC at the same path, get the GPU node selector and tolerations, the secret
environment variables (by Secret name and key) and the plain env of the settings.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from rlhf_pipeline import stages
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.secrets import find_credentials

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
TRAINER_JOB_NAME = "node"  # the runtime's replicated job (and container) that runs the trainer
MANAGER = "rlhf-pipeline"
CACHE_VOLUME = "rlhf-model-cache"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def trainjob_stage(stage: str) -> stages.Stage:
    """The registry stage `stage`, if it may run as a TrainJob (`Stage.trainjob`); else a one-line error."""
    found = stages.get(stage)
    if not found.trainjob:
        able = ", ".join(s.key for s in stages.training_stages())
        raise UserError(f"stage {found.key!r} does not run as a TrainJob (those that do: {able})")
    return found


def trainjob_name(kfp_run_id: str, stage: str) -> str:
    """Deterministic per (run, stage), so a retried launcher finds the TrainJob it started (RFC 1035, <= 63)."""
    digest = hashlib.sha256(f"{kfp_run_id}/{stage}".encode()).hexdigest()[:10]
    stage_part = re.sub(r"[^a-z0-9-]", "-", stage.lower()).strip("-")[:20] or "stage"
    return f"rlhf-{stage_part}-{digest}"


def launch_command(launcher: str, stage: str, config_path: str, num_proc_per_node: int | None) -> list[str]:
    """The trainer container's command: the stage CLI under torchrun (or accelerate), rendezvous from PET_*.

    accelerate needs the TOTAL process count. With `num_proc_per_node` unset the runtime decides the per-node count
    and passes it as $PET_NPROC_PER_NODE, which may be a number or a word (`auto`, `gpu`, `cpu`, as torchrun
    takes it): a word becomes this node's GPU count (at least 1) -- in shell arithmetic it would count as 0.
    `--multi_gpu` whenever there is more than one process in all: accelerate infers it only from several GPUs on
    ONE node, and would otherwise run every node's process on its own.
    """
    cli_stage = trainjob_stage(stage).command
    if launcher == "torchrun":
        return ["torchrun", "--no-python", "rlhf", cli_stage, "--config", config_path]
    procs = str(num_proc_per_node) if num_proc_per_node else "${PET_NPROC_PER_NODE:-auto}"
    script = (
        f'procs="{procs}"; '
        'case "$procs" in ""|*[!0-9]*) '
        "procs=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))') || exit 1;; esac; "
        "total=$(( ${PET_NNODES:-1} * procs )); "
        'multi=""; if [ "$total" -gt 1 ]; then multi="--multi_gpu"; fi; '
        'exec accelerate launch $multi --num_machines "${PET_NNODES:-1}" --machine_rank "${PET_NODE_RANK:-0}" '
        '--main_process_ip "${PET_MASTER_ADDR}" --main_process_port "${PET_MASTER_PORT}" '
        f'--num_processes "$total" -m rlhf_pipeline.cli {cli_stage} --config "$0"'
    )
    return ["bash", "-c", script, config_path]


# The variables that tie the training pods to the pipeline run, forwarded from the launcher pod (where Kubeflow's
# MLflow plugin injected them) to every training pod: they attach to the launcher's MLflow run. The run id goes
# under both names (tracking.RUN_ID_ENV / RUN_ID_COPY_ENV): MLflow removes MLFLOW_RUN_ID once a run ends.
FORWARDED_ENV = ("MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI", "KFP_RUN_ID")


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    """The `FORWARDED_ENV` variables set in `environ` (the launcher's os.environ), the run id under both names."""
    out = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    run_id = environ.get("MLFLOW_RUN_ID") or environ.get("RLHF_MLFLOW_RUN_ID")
    if run_id:
        out["MLFLOW_RUN_ID"] = out["RLHF_MLFLOW_RUN_ID"] = run_id
    return out


# /dev/shm: NCCL (and DataLoader workers) exchange data through shared memory; a container's default /dev/shm is
# 64 MiB, far too small. A memory-backed emptyDir counts against the pod's memory, so it is capped at the pod's
# memory (limit, else request).
SHM_VOLUME = "dshm"
# The images' non-root user (images/bases.env RLHF_UID; the Helm chart's pod security context): fsGroup makes the
# PVC group-writable for it.
IMAGE_UID = 10001


TMP_VOLUME = "tmp"  # the root filesystem is read-only: temp files (torchrun, compile caches) go here


def pod_security_context() -> dict[str, Any]:
    """The "restricted" Pod Security profile, pod level (the chart's `rlhf.podSecurityContext`)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "fsGroup": IMAGE_UID,
        "fsGroupChangePolicy": "OnRootMismatch",  # chown the PVC once, not on every pod start
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """... and container level: no privilege escalation, no capabilities, nothing writable but the volumes."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def build_manifest(
    *,
    name: str,
    stage: str,
    image: str,
    config_path: str,
    settings: dict[str, Any],
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    namespace: str | None = None,
    labels: dict[str, str] | None = None,
    run_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob for one stage. `settings` is `PipelineSettings.model_dump()` (plain data, so the launcher
    component can receive it as a parameter); `run_env`: `forwarded_env(os.environ)` of the launcher."""
    command = trainjob_stage(stage).command
    tj = settings["trainjob"]
    gpu = settings["gpu"]
    res = settings["training_resources"]
    cache = settings["model_cache"]
    requests = {"cpu": res["cpu"], "memory": res["memory"]}
    limits: dict[str, Any] = {}
    if res.get("cpu_limit"):
        limits["cpu"] = res["cpu_limit"]
    if res.get("memory_limit"):
        limits["memory"] = res["memory_limit"]
    if gpu["accelerator_count"] > 0:
        limits[gpu["accelerator_type"]] = str(gpu["accelerator_count"])
    root = cache["mount_path"].rstrip("/")
    env = [
        {"name": k, "value": v}
        for k, v in sorted(
            {
                **settings.get("env", {}),
                **(run_env or {}),
                "RLHF_CACHE_DIR": root,
                "HF_HOME": f"{root}/huggingface",
                "HOME": "/tmp",  # caches under ~ (triton, torch) need a writable home on a read-only root
            }.items()
        )
    ]
    # a TrainJob is readable by anyone who may `get` it: no credential in its plain env
    for place, kind in find_credentials({e["name"]: e["value"] for e in env}):
        raise UserError(f"refusing to create the TrainJob: its env would hold {kind} ({place}); use a Secret")
    for secret in settings.get("secrets", {}).values():
        if stage not in secret["steps"]:
            continue
        for key, var in secret["keys"].items():
            env.append(
                {
                    "name": var,
                    "valueFrom": {
                        "secretKeyRef": {"name": secret["name"], "key": key, "optional": bool(secret["optional"])}
                    },
                }
            )
    trainer: dict[str, Any] = {
        "image": image,
        "command": launch_command(tj["launcher"], stage, config_path, tj.get("num_proc_per_node")),
        "env": env,
        "numNodes": int(tj["num_nodes"]),
        "resourcesPerNode": {"requests": requests, **({"limits": limits} if limits else {})},
    }
    if tj.get("num_proc_per_node"):
        trainer["numProcPerNode"] = int(tj["num_proc_per_node"])

    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "volumes": [
            {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache["pvc_name"]}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": limits.get("memory", res["memory"])}},
            {"name": TMP_VOLUME, "emptyDir": {}},
        ],
        "containers": [
            {
                "name": TRAINER_JOB_NAME,
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": CACHE_VOLUME, "mountPath": cache["mount_path"]},
                    {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
                    {"name": TMP_VOLUME, "mountPath": "/tmp"},
                ],
            }
        ],
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [_k8s_toleration(t) for t in tolerations]
    if tj.get("service_account"):
        pod_spec["serviceAccountName"] = tj["service_account"]

    spec: dict[str, Any] = {
        "runtimeRef": {"name": tj["runtime"], "apiGroup": TRAINER_GROUP, "kind": tj["runtime_kind"]},
        "trainer": trainer,
    }
    if tj["overrides_api"] == "podTemplateOverrides":
        spec["podTemplateOverrides"] = [{"targetJobs": [{"name": TRAINER_JOB_NAME}], "spec": pod_spec}]
    else:
        spec["runtimePatches"] = [
            {
                "manager": MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {"name": TRAINER_JOB_NAME, "template": {"spec": {"template": {"spec": pod_spec}}}}
                            ],
                        }
                    }
                },
            }
        ]
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/part-of": "rlhf-pipeline", "rlhf-pipeline/stage": command, **(labels or {})},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}", "kind": "TrainJob", "metadata": metadata, "spec": spec}


def _k8s_toleration(t: dict[str, Any]) -> dict[str, Any]:
    """Accept snake_case (settings) or camelCase (Kubernetes) tolerations; drop unset fields."""
    out = {
        "key": t.get("key"),
        "operator": t.get("operator"),
        "value": t.get("value"),
        "effect": t.get("effect"),
        "tolerationSeconds": t.get("tolerationSeconds", t.get("toleration_seconds")),
    }
    return {k: v for k, v in out.items() if v is not None}


def validate_manifest(manifest: dict[str, Any]) -> list[str]:
    """Structural problems of a TrainJob manifest (empty list: valid), checked against the v1alpha1 API types."""
    problems: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    need(
        manifest.get("apiVersion") == f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "apiVersion must be trainer.kubeflow.org/v1alpha1",
    )
    need(manifest.get("kind") == "TrainJob", "kind must be TrainJob")
    name = manifest.get("metadata", {}).get("name", "")
    need(bool(_DNS1035.match(name)) and len(name) <= 63, f"metadata.name {name!r} must be an RFC 1035 label (<= 63)")
    spec = manifest.get("spec") or {}
    allowed_spec = {
        "runtimeRef",
        "initializer",
        "trainer",
        "podTemplateOverrides",
        "runtimePatches",
        "suspend",
        "managedBy",
        "labels",
        "annotations",
        "activeDeadlineSeconds",
    }
    need(not (set(spec) - allowed_spec), f"unknown spec fields {sorted(set(spec) - allowed_spec)}")
    ref = spec.get("runtimeRef") or {}
    need(bool(ref.get("name")), "spec.runtimeRef.name is required")
    need(
        ref.get("kind", "ClusterTrainingRuntime") in ("ClusterTrainingRuntime", "TrainingRuntime"),
        "spec.runtimeRef.kind must be ClusterTrainingRuntime or TrainingRuntime",
    )
    trainer = spec.get("trainer") or {}
    allowed_trainer = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}
    need(not (set(trainer) - allowed_trainer), f"unknown trainer fields {sorted(set(trainer) - allowed_trainer)}")
    need(
        isinstance(trainer.get("command"), list) and all(isinstance(c, str) for c in trainer["command"]),
        "spec.trainer.command must be a list of strings",
    )
    need(isinstance(trainer.get("numNodes", 1), int) and trainer.get("numNodes", 1) >= 1, "numNodes must be >= 1")
    for env in trainer.get("env", []):
        need(
            isinstance(env.get("name"), str) and ("value" in env) != ("valueFrom" in env),
            f"env entry {env} needs a name and exactly one of value / valueFrom",
        )
        if "valueFrom" in env:
            ref_ = env["valueFrom"].get("secretKeyRef", {})
            need(
                bool(ref_.get("name")) and bool(ref_.get("key")),
                f"env {env.get('name')}: secretKeyRef needs name and key",
            )
    res = trainer.get("resourcesPerNode", {})
    need(not (set(res) - {"requests", "limits", "claims"}), "resourcesPerNode has only requests/limits/claims")
    if "podTemplateOverrides" in spec:
        for o in spec["podTemplateOverrides"]:
            need(
                bool(o.get("targetJobs")) and all(t.get("name") for t in o["targetJobs"]),
                "podTemplateOverrides[].targetJobs[].name is required",
            )
            problems.extend(_check_pod_spec(o.get("spec", {})))
    if "runtimePatches" in spec:
        for p in spec["runtimePatches"]:
            need(bool(p.get("manager")), "runtimePatches[].manager is required")
            for rj in p.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
                need(bool(rj.get("name")), "replicatedJobs[].name is required")
                problems.extend(
                    _check_pod_spec(rj.get("template", {}).get("spec", {}).get("template", {}).get("spec", {}))
                )
    return problems


def _check_pod_spec(pod: dict[str, Any]) -> list[str]:
    problems = []
    allowed = {
        "serviceAccountName",
        "nodeSelector",
        "affinity",
        "tolerations",
        "volumes",
        "initContainers",
        "containers",
        "schedulingGates",
        "imagePullSecrets",
        "securityContext",
    }
    if set(pod) - allowed:
        problems.append(f"unknown pod override fields {sorted(set(pod) - allowed)}")
    volumes = {v.get("name") for v in pod.get("volumes", [])}
    for c in pod.get("containers", []):
        if not c.get("name"):
            problems.append("override containers need a name")
        if set(c) - {"name", "env", "volumeMounts", "securityContext"}:
            problems.append(
                f"container override {c.get('name')}: unknown fields {sorted(set(c) - {'name', 'env', 'volumeMounts', 'securityContext'})}"
            )
        for m in c.get("volumeMounts", []):
            if m.get("name") not in volumes:
                problems.append(f"volumeMount {m.get('name')} has no matching volume")
            if not str(m.get("mountPath", "")).startswith("/"):
                problems.append(f"volumeMount {m.get('name')} needs an absolute mountPath")
    for t in pod.get("tolerations", []):
        if t.get("operator", "Equal") not in ("Equal", "Exists"):
            problems.append(f"toleration operator {t.get('operator')!r}")
    if not all(isinstance(v, str) for v in pod.get("nodeSelector", {}).values()):
        problems.append("nodeSelector values must be strings")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Talking to the cluster (only inside the launcher pod)
# ---------------------------------------------------------------------------------------------------------------


def current_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
            return fh.read().strip()
    except OSError:
        return "default"


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def check_runtime(api: Any, manifest: dict[str, Any], ns: str) -> None:
    """Fail with one line when the runtime the TrainJob references does not exist: Kubernetes would accept the
    TrainJob and it would never start. (The runner's ClusterRole grants exactly this `get`.)"""
    from kubernetes.client.exceptions import ApiException

    ref = manifest["spec"]["runtimeRef"]
    kind = ref.get("kind", "ClusterTrainingRuntime")
    try:
        if kind == "ClusterTrainingRuntime":
            api.get_cluster_custom_object(TRAINER_GROUP, TRAINER_VERSION, "clustertrainingruntimes", ref["name"])
        else:
            api.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, ns, "trainingruntimes", ref["name"])
    except ApiException as exc:
        if exc.status == 404:
            raise RuntimeError(
                f"{kind} {ref['name']!r} not found: install it (Kubeflow Trainer's runtimes) or set trainjob.runtime"
            ) from None
        raise


def run_trainjob(
    manifest: dict[str, Any], *, poll_seconds: int = 15, timeout_s: float = 48 * 3600, api: Any = None, log=print
) -> dict[str, Any]:
    """Create the TrainJob (or adopt an existing one of that name), wait until Complete or Failed.

    A TrainJob that already failed (a previous launcher attempt) is deleted and recreated: the stage resumes
    from its checkpoints on the PVC. Raises RuntimeError on failure or timeout (the TrainJob is deleted on
    timeout). Returns the final object.
    """
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    from kubernetes.client.exceptions import ApiException

    ns = manifest["metadata"].get("namespace") or current_namespace()
    name = manifest["metadata"]["name"]
    args = (TRAINER_GROUP, TRAINER_VERSION, ns, TRAINJOB_PLURAL)

    try:
        existing = api.get_namespaced_custom_object(*args, name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        existing = None
    if existing is not None and _condition(existing, "Failed"):
        log(f"TrainJob {ns}/{name} failed before; deleting it to retry (the stage resumes from its checkpoints)")
        api.delete_namespaced_custom_object(*args, name, propagation_policy="Foreground")
        while True:
            try:
                api.get_namespaced_custom_object(*args, name)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            time.sleep(poll_seconds)
        existing = None
    if existing is None:
        check_runtime(api, manifest, ns)
        api.create_namespaced_custom_object(*args, manifest)
        log(
            f"created TrainJob {ns}/{name} ({manifest['spec']['trainer'].get('numNodes', 1)} nodes, "
            f"runtime {manifest['spec']['runtimeRef']['name']})"
        )
    else:
        log(f"attached to existing TrainJob {ns}/{name}")

    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object(*args, name)
        if _condition(obj, "Complete"):
            log(f"TrainJob {ns}/{name} complete")
            return obj
        failed = _condition(obj, "Failed")
        if failed:
            raise RuntimeError(f"TrainJob {ns}/{name} failed: {failed.get('reason')}: {failed.get('message')}")
        state = [c.get("type") for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        if state != last:
            log(f"TrainJob {ns}/{name}: {', '.join(state) or 'pending'}")
            last = state
        if time.monotonic() > deadline:
            api.delete_namespaced_custom_object(*args, name, propagation_policy="Foreground")
            raise RuntimeError(f"TrainJob {ns}/{name} did not finish within {timeout_s / 3600:.1f} h; deleted it")
        time.sleep(poll_seconds)
