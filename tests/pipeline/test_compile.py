"""The compiled pipeline (real KFP compiler, kfp-kubernetes platform spec): what a cluster would receive."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.conftest import all_tasks, compile_spec, executor_of

RLHF = str(__import__("pathlib").Path(__import__("sys").executable).parent / "rlhf")
# `-2` / `-3`: the same step in the dpo and both branches; the judge runs with the reward stage's settings
GPU_TASKS = ["sft", "reward", "judge", "ppo", "dpo", "ppo-2", "dpo-2", "evaluate", "evaluate-2", "evaluate-3"]
TRAINING_TASKS = ["sft", "reward", "judge", "ppo", "dpo", "ppo-2", "dpo-2"]


def param(ref: dict) -> str:
    """The pipeline parameter a task input refers to (inside conditions it is renamed pipelinechannel--<name>)."""
    return ref["componentInputParameter"].removeprefix("pipelinechannel--")


@pytest.fixture(scope="module")
def default_spec(tmp_path_factory):
    return compile_spec(tmp_path_factory.mktemp("compile"))


def test_every_stage_is_a_task_with_a_display_name(default_spec):
    spec, _, _ = default_spec
    names = {name: task["taskInfo"]["name"] for name, (task, _) in all_tasks(spec).items()}
    assert names == {
        "validate-config": "Validate configuration",
        "prepare-data": "Prepare data",
        "sft": "Supervised fine-tuning",
        "reward": "Reward model (train + evaluate)",
        "ppo": "PPO",
        "dpo": "DPO",
        "evaluate": "Evaluate policy vs SFT",
        "evaluate-2": "Evaluate policy vs SFT",
        "judge": "Judge reward model (independent)",
        "ppo-2": "PPO",
        "dpo-2": "DPO",
        "evaluate-3": "Evaluate policy vs SFT",
        "report": "Report + alias challenger",
        "report-2": "Report + alias challenger",
        "report-3": "Report + alias challenger",
        "unknown-alignment": "Unknown alignment",
    }


def test_alignment_branches_are_conditions_on_the_parameter(default_spec):
    spec, _, _ = default_spec
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = sorted(t["triggerPolicy"]["condition"] for t in branches.values())
    assert any("'ppo'" in c for c in conditions) and any("'dpo'" in c for c in conditions)
    assert all("pipelinechannel--alignment" in c for c in conditions)


def test_parameters_are_documented(default_spec):
    spec, _, _ = default_spec
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "alignment",
        "input_data",
        "base_model",
        "sft_config",
        "reward_config",
        "ppo_config",
        "dpo_config",
        "evaluate_config",
        "mlflow_tracking_uri",
        "gpu_node_selector",
        "gpu_tolerations",
    ):
        assert params[name].get("description"), name
    assert params["alignment"]["defaultValue"] == "ppo"
    assert params["sft_config"]["parameterType"] == "STRUCT"
    assert params["gpu_tolerations"]["parameterType"] == "LIST"


def test_typed_artifacts_between_steps(default_spec):
    spec, _, _ = default_spec
    comps = spec["components"]

    def out_types(comp):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[comp]["outputDefinitions"]["artifacts"].items()}

    assert out_types("comp-prepare-data") == {"data": "system.Dataset", "metrics": "system.Metrics"}
    for comp in ("comp-sft", "comp-reward", "comp-ppo", "comp-dpo"):
        assert out_types(comp) == {"model": "system.Model", "metrics": "system.Metrics"}
    assert out_types("comp-evaluate") == {
        "metrics": "system.Metrics",
        "report": "system.Markdown",
        "generations": "system.Dataset",
    }
    assert out_types("comp-report") == {
        "summary": "system.Metrics",
        "report_md": "system.Markdown",
        "report_html": "system.HTML",
    }
    ins = comps["comp-ppo"]["inputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in ins.items()} == {
        "data": "system.Dataset",
        "sft_model": "system.Model",
        "reward_model": "system.Model",
    }


def test_gpu_settings_on_gpu_steps_only(default_spec):
    spec, platform, _ = default_spec
    for task in GPU_TASKS:
        label, ex = executor_of(spec, task)
        acc = ex["container"]["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1", task
        k8s = platform[label]
        assert param(k8s["nodeSelector"]["nodeSelectorJson"]) == "gpu_node_selector", task
        assert [param(t["tolerationJson"]) for t in k8s["tolerations"]] == ["gpu_tolerations"], task
    for task in ("prepare-data", "report", "unknown-alignment"):
        label, ex = executor_of(spec, task)
        assert "accelerator" not in ex["container"].get("resources", {}), task
        assert "nodeSelector" not in platform.get(label, {}) and "tolerations" not in platform.get(label, {})
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}
    assert params["gpu_tolerations"]["defaultValue"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_cpu_and_memory_requests(default_spec):
    spec, _, _ = default_spec
    _, ex = executor_of(spec, "sft")
    assert ex["container"]["resources"]["resourceCpuRequest"] == "8"
    assert ex["container"]["resources"]["resourceMemoryRequest"] == "32Gi"
    _, ex = executor_of(spec, "prepare-data")
    assert ex["container"]["resources"]["resourceCpuRequest"] == "2"
    assert ex["container"]["resources"]["resourceMemoryRequest"] == "8Gi"


def test_retries_with_backoff_on_training_only(default_spec):
    spec, _, _ = default_spec
    tasks = all_tasks(spec)
    for name in TRAINING_TASKS:
        assert tasks[name][0]["retryPolicy"] == {
            "maxRetryCount": 2,
            "backoffDuration": "60s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "3600s",
        }, name
    for name in ("prepare-data", "evaluate", "report"):
        assert "retryPolicy" not in tasks[name][0], name


def test_caching_on_for_data_off_for_training(default_spec):
    spec, _, _ = default_spec
    tasks = all_tasks(spec)
    assert tasks["prepare-data"][0]["cachingOptions"] == {"enableCache": True}
    for name in ("sft", "reward", "ppo", "dpo", "evaluate", "evaluate-2", "report", "report-2"):
        assert not tasks[name][0].get("cachingOptions", {}).get("enableCache", False), name


def test_model_cache_pvc_and_cache_env_on_every_step(default_spec):
    spec, platform, _ = default_spec
    for task in ("prepare-data", "sft", "reward", "ppo", "dpo", "evaluate", "report"):
        label, ex = executor_of(spec, task)
        mounts = platform[label]["pvcMount"]
        assert [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"]) for m in mounts] == [
            ("rlhf-model-cache", "/mnt/rlhf-cache")
        ], task
        env = {e["name"]: e["value"] for e in ex["container"]["env"]}
        assert env["RLHF_CACHE_DIR"] == "/mnt/rlhf-cache" and env["HF_HOME"] == "/mnt/rlhf-cache/huggingface"


def test_secrets_are_references_never_values(default_spec, tmp_path, monkeypatch):
    spec, platform, text = default_spec
    label, _ = executor_of(spec, "sft")
    refs = {
        s["secretNameParameter"]["runtimeValue"]["constant"]: {k["secretKey"]: k["envVar"] for k in s["keyToEnv"]}
        for s in platform[label]["secretAsEnv"]
    }
    assert refs == {
        "mlflow-credentials": {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
        "hf-token": {"token": "HF_TOKEN"},
        "s3-credentials": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
    }
    for s in platform[label]["secretAsEnv"]:
        assert set(s) <= {"secretName", "secretNameParameter", "keyToEnv", "optional"}
    # no step carries a secret as a plain env value
    for ex in spec["deploymentSpec"]["executors"].values():
        names = {e["name"] for e in ex["container"].get("env", [])}
        assert not names & {"MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN"}
    # values present in the compiling environment never reach the YAML
    for var in ("MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN"):
        monkeypatch.setenv(var, f"do-not-leak-{var.lower()}")
    _, _, fresh = compile_spec(tmp_path)
    assert "do-not-leak" not in fresh


def test_settings_file_changes_node_pool_accelerator_and_secrets(tmp_path):
    settings = """
gpu:
  accelerator_type: nvidia.com/gpu
  accelerator_count: 4
  node_selector: {cloud.google.com/gke-accelerator: nvidia-h100-80gb}
  tolerations:
    - {key: dedicated, operator: Equal, value: rlhf, effect: NoSchedule}
training_resources: {cpu: "32", memory: 200Gi, memory_limit: 240Gi}
retry: {num_retries: 5, backoff_duration: 120s, backoff_factor: 3}
caching: {prepare_data: false}
model_cache: {pvc_name: team-cache, mount_path: /models}
secrets:
  mlflow: {name: team-mlflow, keys: {token: MLFLOW_TRACKING_TOKEN}, optional: false}
env: {MLFLOW_TRACKING_URI: "https://mlflow.example.com"}
"""
    spec, platform, _ = compile_spec(tmp_path, settings)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert params["gpu_tolerations"]["defaultValue"] == [
        {"key": "dedicated", "operator": "Equal", "value": "rlhf", "effect": "NoSchedule"}
    ]
    label, ex = executor_of(spec, "ppo")
    res = ex["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "4"
    assert res["resourceCpuRequest"] == "32" and res["resourceMemoryLimit"] == "240Gi"
    assert all_tasks(spec)["ppo"][0]["retryPolicy"]["maxRetryCount"] == 5
    assert all_tasks(spec)["ppo"][0]["retryPolicy"]["backoffDuration"] == "120s"
    assert not all_tasks(spec)["prepare-data"][0].get("cachingOptions", {}).get("enableCache", False)
    assert platform[label]["pvcMount"][0]["mountPath"] == "/models"
    assert platform[label]["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "team-cache"
    assert [(s["secretName"], s["optional"] if "optional" in s else False) for s in platform[label]["secretAsEnv"]] == [
        ("team-mlflow", False)
    ]
    env = {e["name"]: e["value"] for e in ex["container"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com" and env["RLHF_CACHE_DIR"] == "/models"


def test_cpu_only_settings_drop_accelerators(tmp_path):
    spec, platform, _ = compile_spec(tmp_path, "gpu: {accelerator_count: 0}\n")
    label, ex = executor_of(spec, "sft")
    assert "accelerator" not in ex["container"]["resources"]
    assert "nodeSelector" not in platform[label]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("gpu: {accelerator_count: -1}", "gpu.accelerator_count"),
        ("gpu: {steps: [sft, train]}", "unknown steps"),
        ("retry: {backoff_duration: 1m}", "durations"),
        ("training_resources: {cpu: lots, memory: 1Gi}", "not a Kubernetes quantity"),
        ("env: {HF_TOKEN: abc}", "look like secrets"),
        ("secrets: {x: {name: s, keys: {k: 'not valid'}}}", "invalid environment variable"),
        ("gpus: {}", "unknown setting"),
        ("[1, 2]", "must be a mapping"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, bad, message):
    import subprocess

    path = tmp_path / "k8s.yaml"
    path.write_text(bad + "\n")
    proc = subprocess.run(
        [RLHF, "compile", "--settings", str(path), "--output", str(tmp_path / "out.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf compile: error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_trainjob_mode_compiles_launchers(tmp_path):
    spec, platform, _ = compile_spec(tmp_path, trainjob=True)
    tasks = all_tasks(spec)
    launchers = {
        name: task for name, (task, comp) in tasks.items() if comp["executorLabel"].startswith("exec-trainjob")
    }
    assert sorted(t["taskInfo"]["name"] for t in launchers.values()) == [
        "DPO (TrainJob)",
        "DPO (TrainJob)",  # the dpo and the both branch
        "PPO (TrainJob)",
        "PPO (TrainJob)",
        "Reward model (train + evaluate) (TrainJob)",
        "Supervised fine-tuning (TrainJob)",
    ]
    for name, task in launchers.items():
        params = task["inputs"]["parameters"]
        stage = params["stage"]["runtimeValue"]["constant"]
        assert stage in ("sft", "reward", "ppo", "dpo")
        assert params["image"]["runtimeValue"]["constant"].split("/")[-1].startswith(f"rlhf-{stage}:")
        settings = params["settings"]["runtimeValue"]["constant"]
        assert settings["distributed"] == "trainjob" and settings["trainjob"]["runtime"] == "torch-distributed"
        assert param(params["gpu_node_selector"]) == "gpu_node_selector"
        assert task["retryPolicy"]["maxRetryCount"] == 2
        label = tasks[name][1]["executorLabel"]
        # the launcher itself is a small CPU pod: no accelerator, no GPU node pool
        assert "accelerator" not in spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert "nodeSelector" not in platform[label]
        assert platform[label]["pvcMount"][0]["mountPath"] == "/mnt/rlhf-cache"
    # evaluation still runs in-pod on the GPU pool
    label, ex = executor_of(spec, "evaluate")
    assert ex["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_committed_yaml_is_up_to_date():
    """Golden test: pipelines/rlhf_pipeline.yaml is what `rlhf compile` produces now (run it and commit if not)."""
    from pipelines.rlhf_pipeline import COMPILED
    from rlhf_pipeline.orchestration.compile import is_stale

    assert COMPILED.is_file(), "pipelines/rlhf_pipeline.yaml is missing: run `rlhf compile`"
    assert not is_stale(COMPILED), "pipelines/rlhf_pipeline.yaml is stale: run `rlhf compile` and commit it"


def test_compile_check_flags_a_stale_file(tmp_path):
    import subprocess

    stale = tmp_path / "old.yaml"
    from pipelines.rlhf_pipeline import COMPILED

    stale.write_text(COMPILED.read_text().replace("Supervised fine-tuning", "SFT (old)"))
    proc = subprocess.run([RLHF, "compile", "--check", "-o", str(stale)], capture_output=True, text=True)
    assert proc.returncode == 1 and "stale" in proc.stderr
    proc = subprocess.run([RLHF, "compile", "--check", "-o", str(COMPILED)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_images_come_from_images_yaml(default_spec):
    from components.images import image_for

    spec, _, _ = default_spec
    for task, component in (
        ("validate-config", "ops"),
        ("unknown-alignment", "ops"),
        ("judge", "reward"),
        ("sft", "sft"),
        ("prepare-data", "prepare_data"),
        ("ppo", "ppo"),
        ("report", "report"),
        ("evaluate", "evaluate"),
        ("dpo", "dpo"),
        ("reward", "reward"),
    ):
        _, ex = executor_of(spec, task)
        assert ex["container"]["image"] == image_for(component)
    assert json.dumps(spec).count("pip install") == 0  # images carry the project: no install at run time


# --------------------------------------------------------------------------------------------------------------
# What the Kubeflow UI gets: pullable images, typed parameters with real defaults, every step after validation
# --------------------------------------------------------------------------------------------------------------

# Every parameter of the pipeline: (KFP type, default as the compiled YAML holds it; numbers are doubles there).
EXPECTED_PARAMETERS = {
    "alignment": ("STRING", "ppo"),
    "input_data": ("STRING", "/mnt/rlhf-cache/datasets/beer.stackexchange.com/Posts.xml"),
    "base_model": ("STRING", "smollm2-135m-instruct"),
    "prepare_data_config": ("STRUCT", {}),
    "sft_config": ("STRUCT", {}),
    "reward_config": ("STRUCT", {}),
    "ppo_config": ("STRUCT", {}),
    "dpo_config": ("STRUCT", {}),
    "evaluate_config": ("STRUCT", {}),
    "judge_config": ("STRUCT", {}),
    "sft_max_steps": ("NUMBER_INTEGER", 0.0),
    "sft_seq_length": ("NUMBER_INTEGER", 512.0),
    "reward_max_steps": ("NUMBER_INTEGER", 0.0),
    "judge_max_steps": ("NUMBER_INTEGER", 0.0),
    "ppo_steps": ("NUMBER_INTEGER", 20.0),
    "ppo_batch_size": ("NUMBER_INTEGER", 8.0),
    "dpo_max_steps": ("NUMBER_INTEGER", 0.0),
    "evaluate_max_questions": ("NUMBER_INTEGER", 32.0),
    "mlflow_tracking_uri": ("STRING", "$MLFLOW_TRACKING_URI"),
    "experiment_name": ("STRING", "rlhf-pipeline"),
    "registered_model_prefix": ("STRING", "rlhf"),
    "work_root": ("STRING", "/mnt/rlhf-cache/runs"),
    "report_samples": ("NUMBER_INTEGER", 4.0),
    "gpu_node_selector": ("STRUCT", {"nvidia.com/gpu.present": "true"}),
    "gpu_tolerations": ("LIST", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
}
# task -> the image it must pull (without registry and tag)
EXPECTED_IMAGES = {
    "validate-config": "rlhf-ops",
    "prepare-data": "rlhf-prepare-data",
    "sft": "rlhf-sft",
    "reward": "rlhf-reward",
    "judge": "rlhf-reward",
    "ppo": "rlhf-ppo",
    "ppo-2": "rlhf-ppo",
    "dpo": "rlhf-dpo",
    "dpo-2": "rlhf-dpo",
    "evaluate": "rlhf-evaluate",
    "evaluate-2": "rlhf-evaluate",
    "evaluate-3": "rlhf-evaluate",
    "report": "rlhf-report",
    "report-2": "rlhf-report",
    "report-3": "rlhf-report",
    "unknown-alignment": "rlhf-ops",
}


def compile_cli(tmp_path, *args) -> tuple[dict, str]:
    import subprocess

    import yaml

    out = tmp_path / "pipeline.yaml"
    proc = subprocess.run([RLHF, "compile", "-o", str(out), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return next(yaml.safe_load_all(out.read_text())), proc.stdout


@pytest.fixture(scope="module")
def retargeted(tmp_path_factory):
    """`rlhf compile --registry example.org/rlhf --tag 1.2.3`, as a user runs it."""
    return compile_cli(tmp_path_factory.mktemp("retarget"), "--registry", "example.org/rlhf", "--tag", "1.2.3")


def test_registry_and_tag_retarget_every_image(retargeted):
    spec, stdout = retargeted
    tasks = all_tasks(spec)
    assert set(tasks) == set(EXPECTED_IMAGES)
    for task, name in EXPECTED_IMAGES.items():
        assert executor_of(spec, task)[1]["container"]["image"] == f"example.org/rlhf/{name}:1.2.3", task
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images == {f"example.org/rlhf/{name}:1.2.3" for name in EXPECTED_IMAGES.values()}
    assert "images: example.org/rlhf/rlhf-dpo:1.2.3, " in stdout


def test_every_parameter_has_its_type_and_a_default_the_run_form_accepts(retargeted, default_spec):
    for spec in (retargeted[0], default_spec[0]):
        params = spec["root"]["inputDefinitions"]["parameters"]
        assert {name: (p["parameterType"], p["defaultValue"]) for name, p in params.items()} == EXPECTED_PARAMETERS
        assert all(p["defaultValue"] != "" for p in params.values())  # the form treats "" as missing


def test_every_step_runs_after_the_validation(default_spec):
    spec, _, _ = default_spec
    tasks = all_tasks(spec)
    assert tasks["prepare-data"][0]["dependentTasks"] == ["validate-config"]
    # the training steps take their options from the validation's outputs (so they cannot start before it)
    for name in TRAINING_TASKS + ["evaluate", "evaluate-2", "evaluate-3"]:
        config = tasks[name][0]["inputs"]["parameters"]["config"]
        # at the top level a task output; inside a condition the same output passed in as `pipelinechannel--...`
        source = config.get("taskOutputParameter", {}).get("producerTask") or config["componentInputParameter"]
        assert source in ("validate-config", f"pipelinechannel--validate-config-{name.split('-')[0]}_config"), name
    assert "validate-config" in tasks["sft"][0]["dependentTasks"]


def test_trainjob_launchers_get_the_retargeted_images(tmp_path):
    spec, _ = compile_cli(tmp_path, "--trainjob", "--registry", "registry.example.com:5000/ml", "--tag", "v9")
    for name, (task, comp) in all_tasks(spec).items():
        if comp["executorLabel"].startswith("exec-trainjob"):
            stage = task["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]
            image = task["inputs"]["parameters"]["image"]["runtimeValue"]["constant"]
            assert image == f"registry.example.com:5000/ml/rlhf-{stage}:v9", name
            label = comp["executorLabel"]
            assert spec["deploymentSpec"]["executors"][label]["container"]["image"] == (
                "registry.example.com:5000/ml/rlhf-ops:v9"
            )


def test_digests_from_an_images_file_are_kept_where_the_image_is_the_same(tmp_path):
    import yaml

    digest = "sha256:" + "ab" * 32
    data = yaml.safe_load((__import__("components.images").images.REPO_IMAGES_FILE).read_text())
    data.update(registry="registry.example.com/team", tag="v2")
    for entry in data["images"].values():
        entry["digest"] = digest
    images_file = tmp_path / "images.yaml"
    images_file.write_text(yaml.safe_dump(data))
    spec, _ = compile_cli(tmp_path, "--images-file", str(images_file))
    _, ex = executor_of(spec, "sft")
    assert ex["container"]["image"] == f"registry.example.com/team/rlhf-sft:v2@{digest}"
    # another tag is another image: its digest is not known, so the reference is by tag
    spec, _ = compile_cli(tmp_path, "--images-file", str(images_file), "--tag", "v3")
    assert executor_of(spec, "sft")[1]["container"]["image"] == "registry.example.com/team/rlhf-sft:v3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--registry", "https://example.org/rlhf"], "is not a valid image registry"),
        (["--registry", "Example.org/RLHF"], "is not a valid image registry"),
        (["--registry", "example.org//rlhf"], "is not a valid image registry"),
        (["--tag", "1.2.3/x"], "is not a valid image tag"),
        (["--images-file", "/nonexistent/images.yaml"], "not found"),
    ],
)
def test_bad_image_options_are_one_line_errors(tmp_path, args, message):
    import subprocess

    out = tmp_path / "out.yaml"
    proc = subprocess.run([RLHF, "compile", "-o", str(out), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf compile: error:") and message in lines[0], proc.stderr
    assert not out.exists()


def test_committed_yaml_pulls_from_the_production_registry():
    """The golden YAML pulls from images.yaml's registry, never a local one."""
    import yaml

    from components.images import load_images
    from pipelines.rlhf_pipeline import COMPILED

    registry = load_images()["registry"]
    spec = next(yaml.safe_load_all(COMPILED.read_text()))
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images and all(i.startswith(registry + "/rlhf-") for i in images), images
    assert not registry.startswith(("localhost", "127.", "host.containers.internal"))


def test_params_become_the_compiled_defaults(tmp_path):
    params = tmp_path / "run.yaml"
    params.write_text("alignment: dpo\ndpo_max_steps: 300\nsft_config: {lora_r: 16}\n")
    spec, _ = compile_cli(tmp_path, "--params-file", str(params), "--param", "dpo_max_steps=400")
    defaults = {name: p["defaultValue"] for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["alignment"] == "dpo" and defaults["dpo_max_steps"] == 400  # --param wins over the file
    assert defaults["sft_config"] == {"lora_r": 16} and defaults["ppo_steps"] == 20.0  # the rest untouched


@pytest.mark.parametrize(
    "param, message",
    [
        ('sft_config={"max_seq_length": 1024}', "sft_config: unknown option max_seq_length"),
        ("evaluate_max_questions=0", "evaluate_max_questions: Input should be greater than 0 (got 0)"),
        ("no_such=1", "not a pipeline parameter"),
    ],
)
def test_a_bad_param_default_is_refused_and_nothing_written(tmp_path, param, message):
    import subprocess

    out = tmp_path / "out.yaml"
    proc = subprocess.run([RLHF, "compile", "-o", str(out), "--param", param], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf compile: error:") and message in lines[0], proc.stderr
    assert not out.exists()
