"""TrainJob mode: the manifest a launcher would create (structure, against the v1alpha1 API types) and the
launcher's create / wait / retry logic against a fake Kubernetes API."""

from __future__ import annotations

import pytest

from rlhf_pipeline.orchestration import trainjob as tj
from rlhf_pipeline.orchestration.settings import PipelineSettings


def settings_data(**overrides) -> dict:
    return PipelineSettings.load(None, overrides).model_dump(mode="json", exclude_none=True)


def manifest(stage="sft", **overrides):
    return tj.build_manifest(
        name=tj.trainjob_name("0b1c2d3e-run", stage),
        stage=stage,
        image="registry/rlhf-sft:dev",
        config_path="/mnt/rlhf-cache/runs/run/sft/config.yaml",
        settings=settings_data(**overrides),
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def test_manifest_is_a_valid_trainjob():
    m = manifest()
    assert tj.validate_manifest(m) == []
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    spec = m["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    assert trainer["command"] == [
        "torchrun",
        "--no-python",
        "rlhf",
        "sft",
        "--config",
        "/mnt/rlhf-cache/runs/run/sft/config.yaml",
    ]
    assert trainer["numNodes"] == 2
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    env = {e["name"]: e for e in trainer["env"]}
    assert env["RLHF_CACHE_DIR"]["value"] == "/mnt/rlhf-cache"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}
    assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]
    override = spec["podTemplateOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    pod = override["spec"]
    assert pod["volumes"] == [
        {"name": "rlhf-model-cache", "persistentVolumeClaim": {"claimName": "rlhf-model-cache"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},  # NCCL's shared memory
        {"name": "tmp", "emptyDir": {}},  # the only writable path besides the PVC (read-only root)
    ]
    assert pod["containers"] == [
        {
            "name": "node",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": "rlhf-model-cache", "mountPath": "/mnt/rlhf-cache"},
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    ]
    assert env["HOME"]["value"] == "/tmp"
    # the images' non-root user may write to the PVC
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_runtime_patches_variant_and_options():
    m = manifest(
        "reward",
        trainjob={
            "overrides_api": "runtimePatches",
            "num_nodes": 4,
            "num_proc_per_node": 8,
            "launcher": "accelerate",
            "runtime": "my-torch",
            "service_account": "trainer",
        },
    )
    assert tj.validate_manifest(m) == []
    spec = m["spec"]
    assert "podTemplateOverrides" not in spec
    patch = spec["runtimePatches"][0]
    assert patch["manager"] == "rlhf-pipeline"
    job = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert job["name"] == "node"
    assert job["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"
    assert spec["trainer"]["numNodes"] == 4 and spec["trainer"]["numProcPerNode"] == 8
    assert spec["trainer"]["command"][:2] == ["bash", "-c"] and "accelerate launch" in spec["trainer"]["command"][2]
    assert "rlhf_pipeline.cli reward" in spec["trainer"]["command"][2]
    assert spec["runtimeRef"]["name"] == "my-torch"


def _run_launcher_script(command: list[str], **env: str) -> list[str]:
    """The accelerate launcher's bash script, run with `accelerate` replaced by echo: the arguments it would get."""
    import os
    import subprocess
    import sys

    assert command[:2] == ["bash", "-c"]
    script = command[2].replace("exec accelerate", "echo").replace("python3 -c", f"{sys.executable} -c")
    pet = {"PET_MASTER_ADDR": "master", "PET_MASTER_PORT": "29500", "PET_NODE_RANK": "0", **env}
    out = subprocess.run(
        ["bash", "-c", script, command[3]], env={"PATH": os.environ["PATH"], **pet}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize(
    "per_node, env, processes, multi",
    [
        (None, {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "auto"}, "2", True),  # the runtime's word: GPUs here (0 -> 1)
        (None, {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4"}, "8", True),
        (None, {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"}, "1", False),
        (8, {"PET_NNODES": "2"}, "16", True),
    ],
)
def test_accelerate_launcher_counts_processes_when_the_runtime_decides(per_node, env, processes, multi):
    """`auto` (numProcPerNode left to the runtime) must not become 0 processes in shell arithmetic, and more than
    one process in all needs --multi_gpu (accelerate infers it only from several GPUs on one node)."""
    args = _run_launcher_script(tj.launch_command("accelerate", "sft", "/cfg/config.yaml", per_node), **env)
    assert args[args.index("--num_processes") + 1] == processes
    assert args[args.index("--num_machines") + 1] == env["PET_NNODES"]
    assert ("--multi_gpu" in args) is multi
    assert args[-3:] == ["sft", "--config", "/cfg/config.yaml"]


def test_the_launchers_mlflow_run_reaches_the_training_pods():
    """Kubeflow's MLflow plugin injects MLFLOW_RUN_ID into the launcher pod; the training pods get it (also as
    the copy MLflow does not remove) and attach to that run."""
    forwarded = tj.forwarded_env({"MLFLOW_RUN_ID": "abc", "MLFLOW_EXPERIMENT_ID": "7", "HOME": "/root"})
    assert forwarded == {"MLFLOW_RUN_ID": "abc", "RLHF_MLFLOW_RUN_ID": "abc", "MLFLOW_EXPERIMENT_ID": "7"}
    assert tj.forwarded_env({"RLHF_MLFLOW_RUN_ID": "abc"})["MLFLOW_RUN_ID"] == "abc"  # after MLflow removed it
    m = tj.build_manifest(
        name="rlhf-sft-x",
        stage="sft",
        image="i",
        config_path="/c.yaml",
        settings=settings_data(),
        run_env=forwarded,
    )
    assert tj.validate_manifest(m) == []
    env = {e["name"]: e.get("value") for e in m["spec"]["trainer"]["env"]}
    assert env["MLFLOW_RUN_ID"] == env["RLHF_MLFLOW_RUN_ID"] == "abc" and env["MLFLOW_EXPERIMENT_ID"] == "7"


def test_a_credential_in_the_forwarded_env_is_refused():
    """The launcher forwards its MLFLOW_TRACKING_URI; one with a password must not land in the TrainJob object."""
    from rlhf_pipeline.errors import UserError

    run_env = tj.forwarded_env({"MLFLOW_TRACKING_URI": "http://ci:Fake-Pw-77@mlflow:5000", "MLFLOW_RUN_ID": "r"})
    with pytest.raises(UserError, match=r"would hold a URI with a password \(MLFLOW_TRACKING_URI\)") as exc:
        tj.build_manifest(
            name="rlhf-sft-x", stage="sft", image="i", config_path="/c", settings=settings_data(), run_env=run_env
        )
    assert "Fake-Pw-77" not in str(exc.value)


def test_names_are_deterministic_dns_labels():
    a = tj.trainjob_name("run-1", "reward")
    assert a == tj.trainjob_name("run-1", "reward") != tj.trainjob_name("run-2", "reward")
    long = tj.trainjob_name("x" * 300, "prepare_data_with_a_very_long_stage_name")
    assert len(long) <= 63 and tj._DNS1035.match(long)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda m: m.update(apiVersion="kubeflow.org/v1"), "apiVersion"),
        (lambda m: m["metadata"].update(name="Bad_Name"), "RFC 1035"),
        (lambda m: m["spec"].pop("runtimeRef"), "runtimeRef.name"),
        (lambda m: m["spec"]["trainer"].update(replicas=2), "unknown trainer fields"),
        (lambda m: m["spec"]["trainer"]["env"].append({"name": "X", "value": "1", "valueFrom": {}}), "exactly one"),
        (
            lambda m: m["spec"]["podTemplateOverrides"][0]["spec"]["containers"][0]["volumeMounts"].append(
                {"name": "nope", "mountPath": "/x"}
            ),
            "no matching volume",
        ),
        (lambda m: m["spec"].update(podSpec={}), "unknown spec fields"),
    ],
)
def test_validation_catches_broken_manifests(mutate, problem):
    m = manifest()
    mutate(m)
    assert any(problem in p for p in tj.validate_manifest(m)), tj.validate_manifest(m)


class FakeApi:
    """Just enough of kubernetes.client.CustomObjectsApi: objects progress through `states` on each get."""

    def __init__(self, states, existing=None):
        self.states = list(states)
        self.objects = {}
        self.created = []
        self.deleted = []
        if existing is not None:
            self.objects["existing"] = existing

    def _not_found(self):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404, reason="Not Found")

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if "existing" in self.objects and not self.created:
            obj = self.objects["existing"]
            if obj is None:
                raise self._not_found()
            return obj
        if not self.created:
            raise self._not_found()
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {
            "status": {"conditions": [{"type": state, "status": "True", "reason": "r", "message": "m"}]}
            if state
            else {}
        }

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.created.append((ns, body))

    runtimes = ("torch-distributed",)  # the ClusterTrainingRuntimes this fake cluster has

    def get_cluster_custom_object(self, group, version, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes")
        if name not in self.runtimes:
            raise self._not_found()
        return {"metadata": {"name": name}}

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.deleted.append(name)
        self.objects["existing"] = None


def test_run_trainjob_creates_and_waits_for_completion():
    api = FakeApi([None, "Created", "Complete"])
    m = manifest()
    m["metadata"]["namespace"] = "team"
    tj.run_trainjob(m, poll_seconds=0, api=api, log=lambda *_: None)
    assert [ns for ns, _ in api.created] == ["team"] and api.created[0][1] is m


def test_missing_runtime_is_one_line_and_creates_nothing():
    api = FakeApi(["Complete"])
    api.runtimes = ()
    with pytest.raises(RuntimeError, match="^ClusterTrainingRuntime 'torch-distributed' not found"):
        tj.run_trainjob(manifest(), poll_seconds=0, api=api, log=lambda *_: None)
    assert api.created == []


def test_run_trainjob_raises_on_failure():
    api = FakeApi(["Failed"])
    with pytest.raises(RuntimeError, match="failed"):
        tj.run_trainjob(manifest(), poll_seconds=0, api=api, log=lambda *_: None)


def test_retried_launcher_recreates_a_failed_trainjob():
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    api = FakeApi(["Complete"], existing=failed)
    tj.run_trainjob(manifest(), poll_seconds=0, api=api, log=lambda *_: None)
    assert api.deleted and len(api.created) == 1


def test_retried_launcher_attaches_to_a_running_trainjob():
    running = {"status": {"conditions": [{"type": "Created", "status": "True"}]}}

    class Attached(FakeApi):
        def get_namespaced_custom_object(self, *args):
            self.calls = getattr(self, "calls", 0) + 1
            return running if self.calls < 3 else {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}

    api = Attached([])
    tj.run_trainjob(manifest(), poll_seconds=0, api=api, log=lambda *_: None)
    assert api.created == [] and api.deleted == []


@pytest.mark.parametrize("stage", ["evaluate", "prepare_data"])
def test_only_trainjob_stages_of_the_registry_become_trainjobs(stage):
    from rlhf_pipeline.errors import UserError

    with pytest.raises(UserError, match="does not run as a TrainJob"):
        manifest(stage)


class Art:
    """A KFP artifact as a component body sees it: a path and metadata."""

    def __init__(self, path, **metadata):
        self.path, self.metadata = str(path), dict(metadata)


@pytest.mark.parametrize(
    "stage, inputs, want",
    [
        ("sft", {}, {"model": "BASE"}),
        ("reward", {"sft_model"}, {"model": "SFT/merged"}),
        ("ppo", {"sft_model", "reward_model"}, {"model": "SFT/merged", "reward_model": "RM"}),
        ("dpo", {"sft_model"}, {"model": "SFT/merged"}),
    ],
)
def test_launcher_wires_the_stage_from_its_inputs(stage, inputs, want, tmp_path, monkeypatch):
    """The launcher body (components/trainjob.py) starts a stage after SFT from SFT's merged weights, the first
    one from the base model, and passes the reward model where it is given: by its inputs, not by stage name."""
    import yaml

    from components.trainjob import trainjob

    for name in ("data", "SFT/merged", "RM"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "data" / "stats.json").write_text("{}")
    (tmp_path / "SFT" / "merged" / "config.json").write_text("{}")
    created = []
    monkeypatch.setattr(tj, "run_trainjob", lambda manifest, **_: created.append(manifest))
    monkeypatch.setenv("MLFLOW_RUN_ID", "kfp-created-run")  # injected by Kubeflow's MLflow plugin
    arts = {
        "sft_model": Art(tmp_path / "sft-art", output_dir=str(tmp_path / "SFT")),
        "reward_model": Art(tmp_path / "rm-art", output_dir=str(tmp_path / "RM")),
    }
    trainjob.python_func(
        stage=stage,
        image="registry/rlhf-x:dev",
        data=Art(tmp_path / "data-art", output_dir=str(tmp_path / "data")),
        config={},
        settings=settings_data(),
        gpu_node_selector={},
        gpu_tolerations=[],
        model=Art(tmp_path / "model-art"),
        metrics=None,
        base_model="BASE",
        kfp_run_id="run-1",
        work_root=str(tmp_path / "work"),
        **{k: v for k, v in arts.items() if k in inputs},
    )
    assert len(created) == 1 and created[0]["spec"]["trainer"]["command"][3] == stage
    cfg = yaml.safe_load((tmp_path / "work" / "run-1" / stage / "config.yaml").read_text())
    expected = {k: (v if v == "BASE" else str(tmp_path / v)) for k, v in want.items()}
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["data"] == str(tmp_path / "work" / "run-1" / "data")
    env = {e["name"]: e.get("value") for e in created[0]["spec"]["trainer"]["env"]}
    assert env["MLFLOW_RUN_ID"] == env["RLHF_MLFLOW_RUN_ID"] == "kfp-created-run"
