"""What every pipeline component does around its stage: where the stage writes, how its config is built from the
component's parameters and input artifacts, and how its results become Kubeflow artifacts.

Where stage outputs live: a stage writes its full output directory (checkpoints, `adapter/`, `merged/`,
`metrics.json`) under the *work root*, `$RLHF_CACHE_DIR/runs/<kfp run id>/<step>/` by default, which on the
cluster is the shared model-cache PVC. Only the small parts (the LoRA adapter, metrics, reports) are copied into
the step's output artifact; the artifact's metadata `output_dir` points at the full directory, which the next
steps read (the reward model trains on top of `<sft output_dir>/merged`). So multi-GB merged weights are never
copied through the artifact store, and a retried step (same run id) finds its checkpoints and resumes.

Everything here runs inside component processes (imported lazily by the component functions).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import METRICS_FILE, StageResult

# Keys the pipeline wires itself; a stage config dict from the user may not set them.
WIRED_KEYS = {"data", "output", "input"}
# What a model artifact carries besides its metadata (the rest stays in output_dir).
ARTIFACT_PARTS = ("adapter", METRICS_FILE, "report.md", "generations.jsonl", "stats.json")


def run_key(kfp_run_id: str) -> str:
    """A directory-safe name for the pipeline run (Kubeflow's run id; a timestamp when there is none)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", (kfp_run_id or "").strip()).strip("-.")
    if not key or key.startswith("{{"):
        key = time.strftime("run-%Y%m%d-%H%M%S")
    return key


def work_dir(work_root: str, kfp_run_id: str, step: str) -> Path:
    """`<work_root or $RLHF_CACHE_DIR/runs>/<run>/<step>`, created."""
    if work_root:
        root = Path(work_root).expanduser()
    else:
        from rlhf_pipeline.modeling.loading import cache_root

        root = cache_root() / "runs"
    path = root / run_key(kfp_run_id) / step
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(artifact: Any) -> Path:
    """The full output directory of the step that produced `artifact` (its metadata), else the artifact itself."""
    meta = getattr(artifact, "metadata", None) or {}
    out = meta.get("output_dir")
    if out and Path(out).is_dir():
        return Path(out)
    path = Path(artifact.path)
    if not path.exists():
        raise UserError(f"input artifact {artifact.path} does not exist (and no output_dir in its metadata)")
    return path


def merged_model(artifact: Any) -> str:
    """The merged (full) model an upstream training step wrote: `<output_dir>/merged`."""
    base = stage_dir(artifact)
    merged = base / "merged"
    if (merged / "config.json").is_file():
        return str(merged)
    if (base / "config.json").is_file():
        return str(base)
    raise UserError(f"no merged model in {base} (expected {merged}/config.json)")


def tracking_values(
    tracking_uri: str, experiment_name: str, registered_model_prefix: str, kfp_run_id: str
) -> dict[str, Any]:
    values: dict[str, Any] = {"experiment_name": experiment_name, "registered_model_prefix": registered_model_prefix}
    if tracking_uri:
        values["tracking_uri"] = tracking_uri
    if kfp_run_id and not kfp_run_id.startswith("{{"):
        values["kfp_run_id"] = kfp_run_id
    return values


def stage_values(config_cls: type, user_config: dict[str, Any] | None, **wired: Any) -> dict[str, Any]:
    """The stage config as a dict: the user's dict for the stage plus the pipeline's wiring (paths, models,
    tracking). Wired values the config class has no field for are dropped, so a stage without e.g.
    `experiment_name` still builds; a key both wired and in the user's dict is an error (one place per value)."""
    user = dict(user_config or {})
    fields = getattr(config_cls, "model_fields", {})
    wired = {k: (str(v) if isinstance(v, Path) else v) for k, v in wired.items() if v is not None and k in fields}
    clash = sorted((set(wired) | WIRED_KEYS) & set(user))
    if clash:
        raise UserError(
            f"{config_cls.__name__}: {', '.join(clash)} set by the pipeline (its parameters and "
            "the upstream steps); remove them from the stage's config"
        )
    return {**user, **wired}


def build_config(config_cls: type, user_config: dict[str, Any] | None, **wired: Any):
    """`config_cls.load` of `stage_values` (one-line UserError on a bad value)."""
    return config_cls.load(None, stage_values(config_cls, user_config, **wired))


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def flat_metrics(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a StageResult (its metrics and `processes`; not its registered versions) or of a (nested)
    dict as `a/b` -> float; booleans, strings, NaN and lists are left out. None: no metrics."""
    if isinstance(data, StageResult):
        data = {"processes": data.processes, **data.metrics}
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            out.update(flat_metrics(value, name))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        if math.isfinite(float(data)):
            out[prefix] = float(data)
    return out


def read_metrics(output_dir: Path) -> StageResult | None:
    """The StageResult a stage wrote to `<output_dir>/metrics.json`, None when there is none (one-line error when
    the file is not a stage result)."""
    if not (Path(output_dir) / METRICS_FILE).is_file():
        return None
    return StageResult.read(output_dir)


def namespaced(step: str, metrics: dict[str, float]) -> dict[str, float]:
    """Prefix metric names with the step's namespace (`rm/accuracy`) unless they already carry one."""
    from rlhf_pipeline.stages import STAGES

    ns = STAGES[step].namespace if step in STAGES else step
    # the evaluation reports every model twice (nested `models/<name>/...` and flat `eval/<name>/...`)
    return {
        (k if k.startswith(ns + "/") else f"{ns}/{k}"): v
        for k, v in metrics.items()
        if not (step == "evaluate" and k.startswith("models/"))
    }


def log_kfp_metrics(metrics_artifact: Any, values: dict[str, float]) -> None:
    for name, value in sorted(values.items()):
        metrics_artifact.log_metric(name, value)


def registered_versions(result: StageResult | None) -> list[dict[str, Any]]:
    """The model versions a stage result registered (`result.registered`, as dicts); none for None."""
    return [v.model_dump() for v in result.registered] if result is not None else []


def publish(
    step: str,
    output_dir: Path,
    artifact: Any,
    metrics_artifact: Any | None,
    result: Any = None,
    parts: Iterable[str] = ARTIFACT_PARTS,
) -> dict[str, float]:
    """Copy the small parts of `output_dir` into `artifact`, point its metadata at `output_dir`, and log the
    stage's final metrics to the Metrics artifact. The stage's result is its metrics.json (also when the stage ran
    elsewhere, as a TrainJob), else `result` (the StageResult its run function returned)."""
    dest = Path(artifact.path)
    dest.mkdir(parents=True, exist_ok=True)
    for name in parts:
        _copy(Path(output_dir) / name, dest / name)
    found = read_metrics(output_dir) or (result if isinstance(result, StageResult) else None)
    values = namespaced(step, flat_metrics(found))
    artifact.metadata["output_dir"] = str(output_dir)
    artifact.metadata["stage"] = step
    versions = registered_versions(found)
    if versions:
        artifact.metadata["registered_model"] = versions[-1]["name"]
        artifact.metadata["registered_version"] = versions[-1]["version"]
    if metrics_artifact is not None:
        log_kfp_metrics(metrics_artifact, values)
    (dest / "step.json").write_text(
        json.dumps({"step": step, "output_dir": str(output_dir), "registered": versions, "metrics": values}, indent=2)
    )
    return values


def run_training_step(
    stage: str,
    user_config: dict[str, Any] | None,
    artifact: Any,
    metrics_artifact: Any,
    *,
    work_root: str,
    kfp_run_id: str,
    tracking_uri: str,
    experiment_name: str,
    registered_model_prefix: str,
    step_dir: str | None = None,
    **wired: Any,
) -> dict[str, float]:
    """What a training component does: build the registry stage's config from the user's dict and the wired
    inputs, run it in its work directory (`step_dir`, default the stage's name; a retried step resumes there),
    publish its model and metrics."""
    from rlhf_pipeline.stages import get

    spec = get(stage)
    out = work_dir(work_root, kfp_run_id, step_dir or stage)
    cfg = build_config(
        spec.config_class(),
        user_config,
        output=str(out),
        **wired,
        **tracking_values(tracking_uri, experiment_name, registered_model_prefix, kfp_run_id),
    )
    return publish(stage, out, artifact, metrics_artifact, spec.run_function()(cfg))


# Pipeline steps that run a registry stage under another name: the judge is the reward stage on the judge subset.
STEP_STAGES = {"judge": "reward"}


def stage_config_class(stage: str) -> type:
    """The config class of a stage or step (imported on demand), from the stage registry."""
    from rlhf_pipeline.stages import get

    return get(STEP_STAGES.get(stage, stage)).config_class()


def evaluate_wiring(
    config_cls: type,
    *,
    data: Any,
    sft_model: Any,
    reward_model: Any,
    policy: Any,
    alignment: str,
    output: Path,
    judge_model: Any = None,
    second_policy: Any = None,
    second_alignment: str = "",
) -> dict[str, Any]:
    """The evaluation stage's inputs from the upstream artifacts (EvaluateConfig: data, output, sft_model,
    reward_model, judge_model, policy NAME=DIR for one or two policies, policy_model_uri of the first one's
    registered version; a stage dir's own metrics.json names the registration of each)."""
    wired: dict[str, Any] = {
        "data": str(stage_dir(data)),
        "output": str(output),
        "sft_model": merged_model(sft_model),
        "reward_model": str(stage_dir(reward_model)),
        "policy": [f"{alignment}={stage_dir(policy)}"],
    }
    if judge_model is not None:
        wired["judge_model"] = str(stage_dir(judge_model))
    if second_policy is not None:
        wired["policy"].append(f"{second_alignment or 'policy2'}={stage_dir(second_policy)}")
    meta = getattr(policy, "metadata", None) or {}
    if meta.get("registered_model") and meta.get("registered_version"):
        wired["policy_model_uri"] = f"models:/{meta['registered_model']}/{meta['registered_version']}"
    fields = set(getattr(config_cls, "model_fields", {}))
    return {k: v for k, v in wired.items() if k in fields}
