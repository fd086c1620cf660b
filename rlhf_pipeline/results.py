"""`StageResult`: what every stage's `run_*` returns, prints as its summary and writes as `<output>/metrics.json`.

One envelope for every stage (status, output, processes, registered versions), with the stage's own final metrics
as further top-level fields (`accuracy`, `reward_mean`, `eval_perplexity`, ...: the same numbers it logged to
MLflow, without the namespace). Consumers read `registered` and `status` from here, never by guessing key names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf_pipeline.errors import UserError

METRICS_FILE = "metrics.json"


class RegisteredVersion(BaseModel):
    """A model version a stage registered in MLflow, and the run that produced it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    uri: str  # models:/<name>/<version>
    run_id: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # MLflow's are ints

    @classmethod
    def from_entries(cls, *entries: Mapping[str, Any] | None) -> list[RegisteredVersion]:
        """`tracking.StageRun.register`'s entries (None: registration off, or not the main process) as versions."""
        return [cls.model_validate(dict(entry)) for entry in entries if entry]


class StageResult(BaseModel):
    model_config = ConfigDict(extra="allow")  # extra fields = the stage's own metrics

    stage: str = Field(description="The registry key of the stage that produced it (stages.py).")
    status: Literal["trained", "reused", "evaluated", "prepared"] = Field(
        description="trained/evaluated/prepared: done by this call; reused: a finished run found in --output."
    )
    output: str = Field(description="The stage's output directory.")
    processes: int = Field(1, description="Processes that ran the stage (accelerate launch).")
    registered: list[RegisteredVersion] = Field(default_factory=list, description="Model versions registered.")

    @classmethod
    def of(
        cls,
        stage: str,
        status: str,
        output: str | Path,
        metrics: Mapping[str, Any],
        *,
        processes: int = 1,
        registered: list[RegisteredVersion] | None = None,
    ) -> StageResult:
        """The envelope around a stage's own `metrics` (whose names may not be envelope fields)."""
        clash = sorted(set(metrics) & (set(cls.model_fields) | {"metrics"}))
        if clash:
            raise ValueError(f"metric names {clash} are StageResult fields")
        return cls.model_validate(
            {
                **metrics,
                "stage": stage,
                "status": status,
                "output": str(output),
                "processes": processes,
                "registered": list(registered or []),
            }
        )

    def reused(self) -> StageResult:
        """The same result, reported by a call that found the run finished instead of doing it."""
        return self.model_copy(update={"status": "reused"})

    @property
    def metrics(self) -> dict[str, Any]:
        """The stage's own fields (everything but the envelope)."""
        return dict(self.model_extra or {})

    def write(self, output: str | Path | None = None) -> Path:
        """`<output>/metrics.json`, written atomically: its presence marks a finished run."""
        path = Path(output or self.output) / METRICS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, output: str | Path) -> StageResult:
        """The result a finished stage wrote to `<output>/metrics.json`; one-line error when unreadable."""
        path = Path(output) / METRICS_FILE
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"{path} not found: the stage has not finished in {output}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"{path} is not a stage result: {first}") from None
