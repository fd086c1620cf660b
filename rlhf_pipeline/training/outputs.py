"""What a finished training stage leaves behind, written once however many processes trained it: `adapter/` and
`merged/`, one registered model version (an MLflow model: modeling/mlflow_model.py), and its `StageResult` as
`<output>/metrics.json` (written last: its presence marks the run finished)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rlhf_pipeline.modeling.lineage import record_lineage
from rlhf_pipeline.modeling.mlflow_model import Task, register_stage_model
from rlhf_pipeline.results import RegisteredVersion, StageResult
from rlhf_pipeline.training.curves import log_training_curves
from rlhf_pipeline.training.loop import on_main_then_wait, write_metrics


def finish_stage(
    accelerator,
    run,
    stage: str,
    output: str,
    metrics: dict[str, Any],
    save: Callable[[], tuple[Path, Path]],
    *,
    register: Literal["merged", "adapter"] = "adapter",
    task: Task = "text-generation",
    artifact_path: str = "model",
    tags: dict[str, str] | None = None,
    name: str | None = None,
) -> StageResult:
    """On the main process: `save()` -> (adapter_dir, merged_dir), register the `register` weights as an MLflow
    model of `task` (a logged model of the run named `artifact_path`; as `name`, default the stage's registered
    name), log and write the result; the other processes wait and return the same metrics (nothing written,
    nothing registered)."""

    def on_main() -> StageResult:
        log_training_curves(run, stage)  # <stage>/curves.png, from the run's metric history
        adapter_dir, merged_dir = save()
        record_lineage(adapter_dir, merged_dir)  # the base's content hash: later stages decide "same base" from it
        entry = register_stage_model(
            run,
            adapter_dir,
            merged_dir,
            task=task,
            weights=register,
            name=name,
            tags=tags,
            artifact_path=artifact_path,
        )
        result = StageResult.of(
            stage,
            "trained",
            output,
            {**metrics, "adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir)},
            processes=accelerator.num_processes,
            registered=RegisteredVersion.from_entries(entry),
        )
        run.log_dict(result.model_dump(mode="json"), f"{stage}/metrics.json")
        write_metrics(output, result)
        return result

    result = on_main_then_wait(accelerator, on_main)
    if result is None:
        result = StageResult.of(stage, "trained", output, metrics, processes=accelerator.num_processes)
    return result
