"""Every pod the chart, the compiled pipeline and the TrainJob launcher can create validates as Pod Security
"restricted": checked with `pod_security.violations` on the real rendered chart (Helm engine), the real compiled
YAML (KFP compiler) and the manifests `trainjob.build_manifest` gives the launcher.

Where each setting comes from (docs/deployment.md "Pod security"): the chart sets everything itself; the
compiled pipeline carries the identity (runAsNonRoot, UID/GID) and the writable emptyDirs, and the KFP backend's
compiler adds the rest to every container it creates; TrainJob pods get the whole context from the
TrainJob's pod override.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.deploy.test_chart import VARIANTS, objects, pod_specs, render
from tests.pipeline.conftest import compile_spec
from tests.security.pod_security import violations

GOOD_POD = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "main",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
    ],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def mutated(path: str, value: Any) -> dict:
    pod = copy.deepcopy(GOOD_POD)
    *parents, leaf = path.split(".")
    node = pod
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    if value is None:
        node.pop(leaf)
    else:
        node[leaf] = value
    return pod


@pytest.mark.parametrize(
    "path, value, rule",
    [
        ("hostNetwork", True, "hostNetwork"),
        ("volumes", [{"name": "h", "hostPath": {"path": "/"}}], "hostPath"),
        ("volumes", [{"name": "n", "nfs": {"server": "x", "path": "/"}}], "not allowed"),
        ("containers.0.securityContext.privileged", True, "privileged"),
        ("containers.0.securityContext.allowPrivilegeEscalation", None, "allowPrivilegeEscalation"),
        ("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}, "drop ALL"),
        ("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}, "capabilities"),
        ("securityContext.runAsNonRoot", None, "runAsNonRoot"),
        ("containers.0.securityContext.runAsNonRoot", False, "runAsNonRoot"),
        ("securityContext.runAsUser", 0, "runAsUser 0"),
        ("securityContext.seccompProfile", None, "seccompProfile must be"),
        ("securityContext.seccompProfile", {"type": "Unconfined"}, "Unconfined"),
        ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "hostPort"),
        ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "unsafe sysctl"),
    ],
)
def test_the_checker_catches_each_rule(path, value, rule):
    assert violations(GOOD_POD) == []
    found = violations(mutated(path, value))
    assert any(rule in v for v in found), found


# ----------------------------------------------------------------------------------------------------------
# The chart
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_pods_are_restricted(variant):
    specs = pod_specs(objects(render(VARIANTS[variant])))
    for where, spec in specs:
        assert violations(spec) == [], where
    assert specs or variant == "job-off"


# ----------------------------------------------------------------------------------------------------------
# The compiled pipeline's step pods
# ----------------------------------------------------------------------------------------------------------

# What the KFP backend's compiler puts on every container of a step pod (kfp-kubernetes 2.17
# `set_security_context`: "Platform security defaults ... are enforced separately by the compiler";
# kubeflow/pipelines backend/src/v2/compiler/argocompiler/security_context.go). The SDK cannot express them.
KFP_BACKEND_CONTAINER_DEFAULTS = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def step_pods(text: str, backend_defaults: bool = True) -> dict[str, dict]:
    """The pod of every executor of a compiled pipeline: its container as compiled, with the platform spec's
    security context, volumes and mounts (what the KFP driver turns them into)."""
    docs = list(yaml.safe_load_all(text))
    executors = docs[0]["deploymentSpec"]["executors"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    pods = {}
    for label, ex in executors.items():
        k8s = platform.get(label, {})
        # the platform spec carries the identity; UIDs are int64 strings in its JSON form
        sc = {k: int(v) if k in ("runAsUser", "runAsGroup") else v for k, v in k8s.get("securityContext", {}).items()}
        if backend_defaults:
            sc = {**KFP_BACKEND_CONTAINER_DEFAULTS, **sc}
        volumes, mounts = [], []
        for m in k8s.get("emptyDirMounts", []):
            volumes.append({"name": m["volumeName"], "emptyDir": {}})
            mounts.append({"name": m["volumeName"], "mountPath": m["mountPath"]})
        for i, m in enumerate(k8s.get("pvcMount", [])):
            claim = m.get("pvcNameParameter", {}).get("runtimeValue", {}).get("constant") or m.get("constant")
            volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
            mounts.append({"name": f"pvc-{i}", "mountPath": m["mountPath"]})
        container = {"name": "main", "image": ex["container"]["image"], "securityContext": sc, "volumeMounts": mounts}
        pods[label] = {"containers": [container], "volumes": volumes}
    return pods


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    gpu_pool = "gpu: {accelerator_count: 4, node_selector: {pool: a100}}\nmodel_cache: {pvc_name: team-cache}\n"
    return {
        "default": compile_spec(tmp_path_factory.mktemp("default"))[2],
        "trainjob": compile_spec(tmp_path_factory.mktemp("trainjob"), trainjob=True)[2],
        "settings": compile_spec(tmp_path_factory.mktemp("settings"), gpu_pool)[2],
    }


@pytest.mark.parametrize("variant", ["default", "trainjob", "settings"])
def test_every_step_pod_is_restricted(compiled, variant):
    pods = step_pods(compiled[variant])
    assert len(pods) >= 8
    for label, pod in pods.items():
        assert violations(pod) == [], label


def test_committed_pipeline_steps_are_restricted():
    from pipelines.rlhf_pipeline import COMPILED

    for label, pod in step_pods(COMPILED.read_text()).items():
        assert violations(pod) == [], label


def test_what_the_backend_adds_is_exactly_what_the_sdk_cannot_set(compiled):
    """Without the backend's defaults the compiled pods fail only on the three fields kfp-kubernetes has no
    setting for; identity (non-root UID) comes from our platform spec."""
    for label, pod in step_pods(compiled["default"], backend_defaults=False).items():
        assert sorted(v.split(": ", 1)[1] for v in violations(pod)) == [
            "allowPrivilegeEscalation must be false",
            "capabilities must drop ALL",
            "seccompProfile must be RuntimeDefault or Localhost (pod or container)",
        ], label
        assert pod["containers"][0]["securityContext"] == {
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "runAsNonRoot": True,
        }
        assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/tmp", "/minio", "/s3", "/gcs"}


# ----------------------------------------------------------------------------------------------------------
# TrainJob pods
# ----------------------------------------------------------------------------------------------------------

# The `node` job's pod of Kubeflow Trainer's torch-distributed ClusterTrainingRuntime (it sets no security
# context: the TrainJob's override is the only source).
RUNTIME_POD = {"containers": [{"name": "node", "image": "pytorch/pytorch", "command": ["torchrun"]}]}


def trainjob_pod(manifest: dict) -> dict:
    """The trainer pod Kubeflow Trainer builds: the runtime's pod, the TrainJob's trainer fields, then its pod
    override (pod fields set, volumes appended, containers merged by name)."""
    spec = manifest["spec"]
    if "podTemplateOverrides" in spec:
        [override] = spec["podTemplateOverrides"]
        pod_override = override["spec"]
    else:
        [patch] = spec["runtimePatches"]
        [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod_override = job["template"]["spec"]["template"]["spec"]
    pod = copy.deepcopy(RUNTIME_POD)
    node = pod["containers"][0]
    trainer = spec["trainer"]
    node.update(image=trainer["image"], command=trainer["command"], env=trainer.get("env", []))
    for key, value in pod_override.items():
        if key == "containers":
            for c in value:
                target = next(x for x in pod["containers"] if x["name"] == c["name"])
                for field, v in c.items():
                    target[field] = target.get(field, []) + v if isinstance(v, list) else v
        elif key == "volumes":
            pod["volumes"] = pod.get("volumes", []) + value
        else:
            pod[key] = value
    return pod


@pytest.mark.parametrize("overrides_api", ["podTemplateOverrides", "runtimePatches"])
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo"])
def test_trainjob_pods_are_restricted(stage, overrides_api):
    from rlhf_pipeline.orchestration import trainjob as tj
    from rlhf_pipeline.orchestration.settings import PipelineSettings

    settings = PipelineSettings.load(None, {"trainjob": {"overrides_api": overrides_api, "service_account": "x"}})
    manifest = tj.build_manifest(
        name=tj.trainjob_name("run", stage),
        stage=stage,
        image=f"registry/rlhf-{stage}:dev",
        config_path=f"/mnt/rlhf-cache/runs/run/{stage}/config.yaml",
        settings=settings.model_dump(mode="json", exclude_none=True),
        node_selector={"pool": "a100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    pod = trainjob_pod(manifest)
    assert violations(pod) == []
    node = pod["containers"][0]
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in node["volumeMounts"]}
    assert writable == {"/mnt/rlhf-cache", "/dev/shm", "/tmp"}  # the read-only root's only writable paths
    assert {"name": "HOME", "value": "/tmp"} in node["env"]
    # and the checker would notice a runtime override that loosened it
    node["securityContext"]["allowPrivilegeEscalation"] = True
    assert violations(pod) == ["container node: allowPrivilegeEscalation must be false"]
