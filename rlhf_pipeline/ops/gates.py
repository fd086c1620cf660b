"""The promotion gates of `rlhf promote`: the thresholds file (Gates), and each gate's verdict on a candidate
version (GateResult). Values are the version's tags, else its source run's metrics; a missing or non-numeric
value fails its gate (fail closed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_pipeline.config import format_validation_error, read_recipe
from rlhf_pipeline.errors import UserError

DEFAULT_GATES = Path(__file__).with_name("default_gates.yaml")


class Gates(BaseModel):
    """Thresholds (the gates file)."""

    model_config = ConfigDict(extra="forbid")

    rm_accuracy_min: float = Field(ge=0, le=1, description="Minimum reward-model accuracy (tag/metric rm/accuracy).")
    kl_max: float = Field(ge=0, description="Maximum KL(policy || SFT) (tag/metric eval/kl).")
    win_rate_min: float = Field(ge=0, le=1, description="Minimum win-rate against SFT (tag/metric eval/win_rate).")
    judge_win_rate_min: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Minimum win-rate against SFT by the independent judge (tag/metric eval/judge_win_rate): the "
        "proxy win-rate alone is the reward model PPO optimized grading itself. None: no judge gate.",
    )
    reward_margin: float = Field(
        0.0, ge=0, description="eval/reward_mean may be at most this much below the champion's."
    )

    @classmethod
    def load(cls, path: str | Path) -> Gates:
        try:
            return cls.model_validate(read_recipe(path))
        except ValidationError as exc:
            raise UserError("gates " + format_validation_error(exc, {}, str(path))) from None


@dataclass
class GateResult:
    gate: str  # the tag/metric name
    value: float | None
    op: str  # ">=" or "<="
    threshold: float | None
    passed: bool
    source: str  # "tag", "run metric", "missing: ..." or "no champion"

    def line(self) -> str:
        value = "missing" if self.value is None else f"{self.value:.4f}"
        threshold = "-" if self.threshold is None else f"{self.threshold:.4f}"
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.gate:<17} {value:>10} {self.op} {threshold:<10} {verdict}  ({self.source})"


def gate_value(client, version, name: str) -> tuple[float | None, str]:
    """(value, source) for `name`: the version tag first, then the source run's metric."""
    raw = (version.tags or {}).get(name)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            return None, f"missing: tag {name}={raw!r} is not a number"
        return (value, "tag") if math.isfinite(value) else (None, f"missing: tag {name}={raw!r} is not finite")
    if version.run_id:
        from mlflow.exceptions import MlflowException

        try:
            metrics = client.get_run(version.run_id).data.metrics
        except MlflowException:
            return None, f"missing: no tag and source run {version.run_id} is unreadable"
        if name in metrics and math.isfinite(metrics[name]):
            return float(metrics[name]), "run metric"
    return None, "missing: no tag or run metric"


def evaluate_gates(client, candidate, champion, gates: Gates) -> list[GateResult]:
    results = []
    for name, op, threshold in (
        ("rm/accuracy", ">=", gates.rm_accuracy_min),
        ("eval/kl", "<=", gates.kl_max),
        ("eval/win_rate", ">=", gates.win_rate_min),
        *([("eval/judge_win_rate", ">=", gates.judge_win_rate_min)] if gates.judge_win_rate_min is not None else []),
    ):
        value, source = gate_value(client, candidate, name)
        passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        results.append(GateResult(name, value, op, threshold, passed, source))

    value, source = gate_value(client, candidate, "eval/reward_mean")
    if champion is None:
        # The first promotion has nothing to beat; the reward must still be present.
        results.append(
            GateResult(
                "eval/reward_mean",
                value,
                ">=",
                None,
                value is not None,
                source if value is None else f"{source}; no champion yet",
            )
        )
    else:
        champ_value, champ_source = gate_value(client, champion, "eval/reward_mean")
        if champ_value is None:
            # A champion without a reward cannot be compared against: fail closed, say why.
            results.append(
                GateResult("eval/reward_mean", value, ">=", None, False, f"champion v{champion.version} {champ_source}")
            )
        else:
            threshold = champ_value - gates.reward_margin
            passed = value is not None and value >= threshold
            results.append(
                GateResult(
                    "eval/reward_mean",
                    value,
                    ">=",
                    threshold,
                    passed,
                    f"{source}; champion v{champion.version} {champ_value:.4f}",
                )
            )
    return results


def dry_run(client, name: str, version: str, gates_path: str | Path = DEFAULT_GATES) -> list[GateResult]:
    """What `rlhf promote` would decide for version `version` of `name` now (against the current `champion`
    alias, if any), changing nothing: the verdict the run summary and the report print."""
    from mlflow.exceptions import MlflowException

    candidate = client.get_model_version(name, str(version))
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:  # no champion yet
        champion = None
    if champion is not None and str(champion.version) == str(candidate.version):
        champion = None  # already the champion: nothing to beat
    return evaluate_gates(client, candidate, champion, Gates.load(gates_path))


def verdict(client, name: str, version: str, gates_path: str | Path = DEFAULT_GATES) -> dict:
    """dry_run as plain data (summary.json, the report): the version, the gates file and one row per gate
    (gate, value, op, threshold, passed, source)."""
    rows = [
        {"gate": r.gate, "value": r.value, "op": r.op, "threshold": r.threshold, "passed": r.passed, "source": r.source}
        for r in dry_run(client, name, version, gates_path)
    ]
    shown = f"ops/{DEFAULT_GATES.name}" if Path(gates_path) == DEFAULT_GATES else str(gates_path)
    return {"model": name, "version": str(version), "gates_file": shown, "results": rows}
