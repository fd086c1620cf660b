"""Compile-time Kubernetes settings of the pipeline: GPU node pools, resources, retries, caching, the model-cache
PVC, secrets and the TrainJob mode.

`rlhf compile --settings k8s.yaml` reads them from YAML (any subset of the fields below; the rest keep their
defaults); `pipelines/rlhf_pipeline.yaml` is compiled from the defaults. The GPU node selector and tolerations
are also *pipeline parameters* (`gpu_node_selector`, `gpu_tolerations`, defaulting to the values here), so a run
can retarget another node pool without recompiling. Kubeflow resolves those two at run time (kfp-kubernetes
`add_node_selector_json` / `add_toleration_json`); accelerator type/count, CPU and memory are compile-time values
(a pipeline parameter there is not supported by `kfp.local`, which `rlhf run` needs).

Secrets are referenced by Kubernetes Secret name and key only: the compiled YAML never holds a value; plain `env`
is refused when a name says secret or a value is one (`rlhf_pipeline.secrets`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_pipeline import stages
from rlhf_pipeline.config import read_recipe
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.secrets import credential_kind, is_secret_name

# Pipeline steps that are not registry stages (no CLI command, no config class): the run report.
PIPELINE_ONLY_STEPS: tuple[str, ...] = ("report",)
DEFAULT_CACHE_MOUNT = "/mnt/rlhf-cache"


# The step lists are read from the stage registry when a setting is built or checked, not at import, so a stage
# registered later (a plugin, a test) is a valid step name like the built-in ones.
def stage_steps() -> list[str]:
    """Every registry stage (the steps that run `rlhf <stage>` code)."""
    return list(stages.STAGES)


def all_steps() -> list[str]:
    """Every step name a setting may list: the registry's stages and the pipeline-only steps."""
    return [*stages.STAGES, *PIPELINE_ONLY_STEPS]


def training_steps() -> list[str]:
    """The training stages (those that can run as a TrainJob): heavy pods and retried by default."""
    return [s.key for s in stages.training_stages()]


def _check_steps(value: list[str] | dict[str, Any]) -> Any:
    unknown = sorted(set(value) - set(all_steps()))
    if unknown:
        raise ValueError(f"unknown steps {unknown} (known: {', '.join(all_steps())})")
    return value


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_DURATION = re.compile(r"^[0-9]+s$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Section):
    cpu: str = Field(description="CPU request, e.g. '4' or '500m'.")
    memory: str = Field(description="Memory request, e.g. '32Gi'.")
    cpu_limit: str | None = Field(None, description="CPU limit (default: none).")
    memory_limit: str | None = Field(None, description="Memory limit (default: none).")

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.match(str(value)):
            raise ValueError(f"not a Kubernetes quantity: {value!r}")
        return value


class Toleration(_Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def to_k8s(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, without unset fields."""
        out = {
            "key": self.key,
            "operator": self.operator,
            "value": self.value,
            "effect": self.effect,
            "tolerationSeconds": self.toleration_seconds,
        }
        return {k: v for k, v in out.items() if v is not None}


class GPU(_Section):
    accelerator_type: str = Field("nvidia.com/gpu", description="Resource name of the accelerator.")
    accelerator_count: int = Field(1, ge=0, description="Accelerators per training pod (0: CPU-only pods).")
    steps: list[str] = Field(
        default_factory=lambda: [s.key for s in stages.gpu_stages()],
        description="Steps that run on the GPU node pool (get accelerator, node selector, tolerations).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="Default of the `gpu_node_selector` pipeline parameter.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Default of the `gpu_tolerations` pipeline parameter.",
    )

    _steps = field_validator("steps")(_check_steps)


class Retry(_Section):
    num_retries: int = Field(2, ge=0, description="Retries of a failed training step (it resumes from its checkpoint).")
    backoff_duration: str = Field("60s", description="Wait before the first retry.")
    backoff_factor: float = Field(2.0, ge=1.0, description="Multiplier of the wait for each further retry.")
    backoff_max_duration: str = Field("3600s", description="Longest wait between retries.")
    steps: list[str] = Field(default_factory=training_steps, description="Steps that are retried.")

    _steps = field_validator("steps")(_check_steps)

    @field_validator("backoff_duration", "backoff_max_duration")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _DURATION.match(value):
            raise ValueError(f"durations are whole seconds like '60s', got {value!r}")
        return value


class ModelCache(_Section):
    pvc_name: str = Field(
        "rlhf-model-cache", description="PVC (ReadWriteMany) with converted base models and stage outputs."
    )
    mount_path: str = Field(DEFAULT_CACHE_MOUNT, description="Where it is mounted; RLHF_CACHE_DIR points here.")

    @field_validator("pvc_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _K8S_NAME.match(value):
            raise ValueError(f"not a Kubernetes object name: {value!r}")
        return value


class SecretRef(_Section):
    name: str = Field(description="Kubernetes Secret name.")
    keys: dict[str, str] = Field(description="Secret key -> environment variable.")
    optional: bool = Field(True, description="Start the pod even if the Secret does not exist.")
    steps: list[str] = Field(default_factory=all_steps, description="Steps that get these variables.")

    _steps = field_validator("steps")(_check_steps)

    @field_validator("keys")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("needs at least one key")
        bad = [env for env in value.values() if not _ENV.match(env)]
        if bad:
            raise ValueError(f"invalid environment variable names {bad}")
        return value


def _default_secrets() -> dict[str, SecretRef]:
    return {
        "mlflow": SecretRef(
            name="mlflow-credentials",
            keys={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
        ),
        "huggingface": SecretRef(name="hf-token", keys={"token": "HF_TOKEN"}, steps=stage_steps()),  # not the report
        "s3": SecretRef(
            name="s3-credentials",
            keys={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
        ),
    }


class TrainJobSettings(_Section):
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the TrainJobs reference.")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    num_nodes: int = Field(2, ge=1, description="Training nodes per TrainJob.")
    num_proc_per_node: int | None = Field(None, ge=1, description="Processes per node (default: the runtime's, GPUs).")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="What runs the stage on each node.")
    namespace: str | None = Field(None, description="Namespace of the TrainJobs (default: the launcher pod's).")
    service_account: str | None = Field(None, description="Service account of the training pods.")
    overrides_api: Literal["podTemplateOverrides", "runtimePatches"] = Field(
        "podTemplateOverrides",
        description="How volumes, node selector and tolerations reach the pods: `podTemplateOverrides` "
        "(Trainer v2.0/v2.1) or `runtimePatches` (newer Trainer releases).",
    )
    poll_seconds: int = Field(15, ge=1, description="How often the launcher checks the TrainJob status.")
    timeout_hours: float = Field(48.0, gt=0, description="The launcher gives up (and deletes the TrainJob) after this.")


class PipelineSettings(_Section):
    """Everything `rlhf compile` needs besides the pipeline code; see docs/pipeline.md."""

    gpu: GPU = Field(default_factory=GPU)
    training_resources: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="32Gi"))
    light_resources: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="8Gi"))
    retry: Retry = Field(default_factory=Retry)
    caching: dict[str, bool] = Field(
        default_factory=lambda: {"prepare_data": True},
        description="Kubeflow step caching per step (a step left out: off). On for data preparation only: it is "
        "deterministic and keyed by its input; training reruns on purpose.",
    )
    model_cache: ModelCache = Field(default_factory=ModelCache)
    secrets: dict[str, SecretRef] = Field(default_factory=_default_secrets)
    env: dict[str, str] = Field(
        default_factory=lambda: {"MLFLOW_TRACKING_URI": "http://rlhf-mlflow:5000"},
        description="Plain (non-secret) environment variables of every step.",
    )
    distributed: Literal["none", "trainjob"] = Field(
        "none", description="`trainjob`: training steps launch a Kubeflow Trainer TrainJob instead of training in-pod."
    )
    trainjob: TrainJobSettings = Field(default_factory=TrainJobSettings)

    _caching_steps = field_validator("caching")(_check_steps)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _ENV.match(k)]
        if bad:
            raise ValueError(f"invalid environment variable names {bad}")
        secretish = [k for k in value if is_secret_name(k)]
        if secretish:
            raise ValueError(f"{secretish} look like secrets: reference a Kubernetes Secret under `secrets:`")
        # by value too: a password in a URI would be written into every task of the compiled YAML
        for name, text in value.items():
            kind = credential_kind(text)
            if kind:
                raise ValueError(
                    f"{name} holds {kind}: plain env is written into the compiled pipeline; give the steps the "
                    "credential from a Kubernetes Secret under `secrets:` (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD)"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if "RLHF_CACHE_DIR" in self.env and self.env["RLHF_CACHE_DIR"] != self.model_cache.mount_path:
            raise ValueError("env.RLHF_CACHE_DIR must equal model_cache.mount_path (or be left out)")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineSettings:
        data: dict[str, Any] = read_recipe(path) if path is not None else {}
        for key, value in (overrides or {}).items():
            data[key] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "settings"
            src = f" in {path}" if path else ""
            msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
            raise UserError(f"settings{src}: {loc}: {msg}") from None

    def cache_env(self) -> dict[str, str]:
        """Variables that put every cache (converted models, Hugging Face downloads) on the model-cache PVC."""
        root = self.model_cache.mount_path.rstrip("/")
        return {"RLHF_CACHE_DIR": root, "HF_HOME": f"{root}/huggingface"}
