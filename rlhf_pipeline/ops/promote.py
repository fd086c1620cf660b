"""`rlhf promote`: gate a registered model version and, if it passes, move the `champion` alias to it.

The candidate (alias `challenger` by default, or a version number) is checked against thresholds from a
gates file (default: `rlhf_pipeline/ops/default_gates.yaml`):

    rm/accuracy      >= rm_accuracy_min          reward-model pairwise accuracy
    eval/kl          <= kl_max                   KL(policy || SFT) bound
    eval/win_rate    >= win_rate_min             win-rate against the SFT policy
    eval/reward_mean >= champion's - reward_margin   (passes when there is no champion yet)

Values come from the version's tags (the evaluation stage sets them on the policy version), falling back
to the metrics of the version's source run. A missing or non-numeric value fails its gate (fail closed).

Exit status: 0 promoted (or already champion), 1 a gate failed (nothing changed), 2 bad input,
3 refused because another promotion got there first (nothing changed).

Concurrency: gates are evaluated without a lock; the commit then (1) takes a promotion lock, which is a
registered model named `<model>.promotion-lock` (creating a registered model is atomic in the registry's
database: a second creator gets RESOURCE_ALREADY_EXISTS), (2) re-reads `champion` and refuses if it moved
since the comparison (compare-and-set), (3) moves the alias and records the decision as version tags,
(4) deletes the lock. What this does not cover: alias changes made outside `rlhf promote` (UI, other
clients) between steps (2) and (3), and a lock left behind by a killed process (`--break-lock` removes it
after checking who holds it). CI additionally serializes promotions per model (concurrency group).
"""

from __future__ import annotations

import getpass
import json
import math
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_pipeline.config import format_validation_error, read_recipe
from rlhf_pipeline.errors import UserError

CHAMPION = "champion"
DEFAULT_GATES = Path(__file__).with_name("default_gates.yaml")
LOCK_SUFFIX = ".promotion-lock"
EXIT_GATE_FAILED = 1
EXIT_REFUSED = 3


class Gates(BaseModel):
    """Thresholds (the gates file)."""

    model_config = ConfigDict(extra="forbid")

    rm_accuracy_min: float = Field(ge=0, le=1, description="Minimum reward-model accuracy (tag/metric rm/accuracy).")
    kl_max: float = Field(ge=0, description="Maximum KL(policy || SFT) (tag/metric eval/kl).")
    win_rate_min: float = Field(ge=0, le=1, description="Minimum win-rate against SFT (tag/metric eval/win_rate).")
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


# ----------------------------------------------------------------------------------------------------------
# MLflow access
# ----------------------------------------------------------------------------------------------------------


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds with one line, instead of the MLflow client's minutes of retries."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310 (user's URI)
            pass
    except urllib.error.HTTPError:
        pass  # it answered; auth or routing problems surface, with their own message, on the first real call
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"MLflow tracking server {uri} is unreachable: {reason}") from None


def _mlflow_error(exc: Exception, what: str) -> UserError:
    code = getattr(exc, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return UserError(f"{what} not found")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return UserError(f"MLflow refused access to {what} ({code}): check MLFLOW_TRACKING_USERNAME/PASSWORD")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"MLflow error on {what}: {first}")


def _aliases(client, model: str) -> dict[str, str]:
    """alias -> version of a registered model (read from the model: an unset alias is simply absent)."""
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in (client.get_registered_model(model).aliases or {}).items()}
    except MlflowException as exc:
        raise _mlflow_error(exc, f"registered model '{model}'") from None


def _champion_version(client, model: str) -> str | None:
    return _aliases(client, model).get(CHAMPION)


def resolve_candidate(client, model: str, candidate: str):
    """The ModelVersion named by a version number or an alias (one-line error if either is missing)."""
    from mlflow.exceptions import MlflowException

    aliases = _aliases(client, model)
    version = candidate if candidate.isdigit() else aliases.get(candidate)
    if version is None:
        raise UserError(f"alias '{candidate}' of model '{model}' not found")
    try:
        return client.get_model_version(model, version)
    except MlflowException as exc:
        raise _mlflow_error(exc, f"version '{version}' of model '{model}'") from None


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
    ):
        value, source = gate_value(client, candidate, name)
        passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        results.append(GateResult(name, value, op, threshold, passed, source))

    value, source = gate_value(client, candidate, "eval/reward_mean")
    if champion is None:
        # The first promotion has nothing to beat; the reward must still be present.
        results.append(GateResult("eval/reward_mean", value, ">=", None, value is not None,
                                  source if value is None else f"{source}; no champion yet"))
    else:
        champ_value, champ_source = gate_value(client, champion, "eval/reward_mean")
        if champ_value is None:
            # A champion without a reward cannot be compared against: fail closed, say why.
            results.append(GateResult("eval/reward_mean", value, ">=", None, False,
                                      f"champion v{champion.version} {champ_source}"))
        else:
            threshold = champ_value - gates.reward_margin
            passed = value is not None and value >= threshold
            results.append(GateResult("eval/reward_mean", value, ">=", threshold, passed,
                                      f"{source}; champion v{champion.version} {champ_value:.4f}"))
    return results


# ----------------------------------------------------------------------------------------------------------
# The commit: lock, compare-and-set, record
# ----------------------------------------------------------------------------------------------------------


def decided_by() -> str:
    who = os.environ.get("GITHUB_ACTOR") or os.environ.get("USER")
    if not who:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
    return who


def _acquire_lock(client, model: str, token: str) -> None:
    from mlflow.exceptions import MlflowException

    lock = model + LOCK_SUFFIX
    try:
        client.create_registered_model(
            lock,
            tags={"promotion/lock_token": token, "promotion/locked_by": decided_by(),
                  "promotion/locked_at": _now()},
            description=f"Held by `rlhf promote` while it moves the '{CHAMPION}' alias of '{model}'; "
                        "deleted when it finishes.",
        )
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise _mlflow_error(exc, f"promotion lock '{lock}'") from None
        holder = _lock_holder(client, lock)
        raise UserError(
            f"another promotion of '{model}' is in progress ({holder}); nothing changed. Retry when it "
            f"finishes, or --break-lock if that process died", exit_code=EXIT_REFUSED) from None


def _lock_holder(client, lock: str) -> str:
    try:
        tags = client.get_registered_model(lock).tags or {}
    except Exception:  # noqa: BLE001 (it may have just been released; the message is best effort)
        return "lock just released"
    return f"lock '{lock}' held by {tags.get('promotion/locked_by', '?')} since {tags.get('promotion/locked_at', '?')}"


def _release_lock(client, model: str, token: str) -> None:
    lock = model + LOCK_SUFFIX
    try:
        tags = client.get_registered_model(lock).tags or {}
        if tags.get("promotion/lock_token") == token:  # never delete a lock someone else took
            client.delete_registered_model(lock)
    except Exception:  # noqa: BLE001 (a failed release must not hide the promotion's own outcome)
        click.echo(f"warning: could not release promotion lock '{lock}'; delete it or use --break-lock", err=True)


def remove_lock(client, model: str) -> str | None:
    """Delete a stale promotion lock; returns who held it (None if there was none)."""
    from mlflow.exceptions import MlflowException

    lock = model + LOCK_SUFFIX
    try:
        holder = _lock_holder(client, lock)
        client.delete_registered_model(lock)
        return holder
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise _mlflow_error(exc, f"promotion lock '{lock}'") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit_promotion(client, model: str, candidate, expected_champion: str | None,
                     results: list[GateResult]) -> dict[str, str]:
    """Move `champion` to `candidate` if it still points at `expected_champion`; record the decision."""
    token = uuid.uuid4().hex
    _acquire_lock(client, model, token)
    try:
        current = _champion_version(client, model)
        if current != expected_champion:
            raise UserError(
                f"refused: '{CHAMPION}' of '{model}' moved from {_v(expected_champion)} to {_v(current)} "
                f"while version {candidate.version} was being gated; nothing changed. Re-run to gate "
                f"against the new champion", exit_code=EXIT_REFUSED)
        client.set_registered_model_alias(model, CHAMPION, candidate.version)
        record = {
            "promotion/decision": "promoted",
            "promotion/decided_by": decided_by(),
            "promotion/decided_at": _now(),
            "promotion/previous_champion": expected_champion or "none",
            "promotion/gates": json.dumps({r.gate: {"value": r.value, "op": r.op, "threshold": r.threshold,
                                                    "passed": r.passed} for r in results}, sort_keys=True),
        }
        ci_run = _ci_run_url()
        if ci_run:
            record["promotion/ci_run"] = ci_run
        for key, value in record.items():
            client.set_model_version_tag(model, candidate.version, key, value)
        if expected_champion is not None:
            client.set_model_version_tag(model, expected_champion, "promotion/superseded_by", str(candidate.version))
        return record
    finally:
        _release_lock(client, model, token)


def _v(version: str | None) -> str:
    return "no champion" if version is None else f"version {version}"


def _ci_run_url() -> str | None:
    env = os.environ
    if env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        return f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Orchestration and CLI
# ----------------------------------------------------------------------------------------------------------


def promote(model: str, candidate: str = "challenger", gates_path: str | Path = DEFAULT_GATES,
            tracking_uri: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Gate `candidate` of `model` and promote it on success. Returns a JSON-able summary with
    `verdict` in {"promoted", "rejected", "already-champion", "would-promote"}."""
    gates = Gates.load(gates_path)
    client = _client(tracking_uri)
    version = resolve_candidate(client, model, candidate)
    champion_v = _champion_version(client, model)
    summary: dict[str, Any] = {"model": model, "candidate": str(version.version), "requested": candidate,
                               "champion_before": champion_v, "gates_file": str(gates_path)}
    if champion_v == str(version.version):
        return {**summary, "verdict": "already-champion", "gates": []}
    champion = client.get_model_version(model, champion_v) if champion_v is not None else None
    results = evaluate_gates(client, version, champion, gates)
    summary["gates"] = [asdict(r) for r in results]
    if not all(r.passed for r in results):
        return {**summary, "verdict": "rejected"}
    if dry_run:
        return {**summary, "verdict": "would-promote"}
    summary["recorded"] = commit_promotion(client, model, version, champion_v, results)
    return {**summary, "verdict": "promoted"}


def _print_human(summary: dict[str, Any]) -> None:
    for r in summary["gates"]:
        click.echo(GateResult(**r).line())
    model, cand, before = summary["model"], summary["candidate"], summary["champion_before"]
    verdict = summary["verdict"]
    if verdict == "promoted":
        click.echo(f"verdict: PROMOTED {model} version {cand} to '{CHAMPION}' (previous: {_v(before)})")
    elif verdict == "would-promote":
        click.echo(f"verdict: WOULD PROMOTE {model} version {cand} (dry run; nothing changed)")
    elif verdict == "already-champion":
        click.echo(f"verdict: {model} version {cand} is already '{CHAMPION}'; nothing to do")
    else:
        failed = ", ".join(r["gate"] for r in summary["gates"] if not r["passed"])
        click.echo(f"verdict: REJECTED {model} version {cand}: failed {failed}; nothing changed")


@click.command("promote", context_settings={"max_content_width": 110})
@click.option("--model-name", required=True, help="Registered model name (the aligned policy).")
@click.option("--candidate", default="challenger", show_default=True,
              help="Version number, or an alias, of the version to gate.")
@click.option("--gates", "gates_path", type=click.Path(dir_okay=False), default=str(DEFAULT_GATES),
              show_default="rlhf_pipeline/ops/default_gates.yaml", help="YAML file with the thresholds.")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI]. Credentials only via "
                   "$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD (or $MLFLOW_TRACKING_TOKEN).")
@click.option("--dry-run", is_flag=True, help="Evaluate the gates, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.option("--break-lock", is_flag=True,
              help="Delete a promotion lock left by a killed process, then exit (promotes nothing).")
def command(model_name: str, candidate: str, gates_path: str, tracking_uri: str | None, dry_run: bool,
            as_json: bool, break_lock: bool) -> int:
    """Gate a registered model version and move its 'champion' alias to it if every gate passes."""
    if break_lock:
        holder = remove_lock(_client(tracking_uri), model_name)
        click.echo(f"removed promotion lock of '{model_name}' ({holder})" if holder
                   else f"no promotion lock for '{model_name}'")
        return 0
    summary = promote(model_name, candidate, gates_path, tracking_uri, dry_run)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_human(summary)
    return EXIT_GATE_FAILED if summary["verdict"] == "rejected" else 0
