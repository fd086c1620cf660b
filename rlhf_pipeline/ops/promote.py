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
import os
import sys
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhf_pipeline import tracking
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ops.gates import DEFAULT_GATES, GateResult, Gates, evaluate_gates

CHAMPION = "champion"
LOCK_SUFFIX = ".promotion-lock"
EXIT_GATE_FAILED = 1
EXIT_REFUSED = 3


# ----------------------------------------------------------------------------------------------------------
# MLflow access
# ----------------------------------------------------------------------------------------------------------


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
            tags={"promotion/lock_token": token, "promotion/locked_by": decided_by(), "promotion/locked_at": _now()},
            description=f"Held by `rlhf promote` while it moves the '{CHAMPION}' alias of '{model}'; "
            "deleted when it finishes.",
        )
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise _mlflow_error(exc, f"promotion lock '{lock}'") from None
        holder = _lock_holder(client, lock)
        raise UserError(
            f"another promotion of '{model}' is in progress ({holder}); nothing changed. Retry when it "
            f"finishes, or --break-lock if that process died",
            exit_code=EXIT_REFUSED,
        ) from None


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
        print(f"warning: could not release promotion lock '{lock}'; delete it or use --break-lock", file=sys.stderr)


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
    return datetime.now(UTC).isoformat(timespec="seconds")


def commit_promotion(
    client, model: str, candidate, expected_champion: str | None, results: list[GateResult]
) -> dict[str, str]:
    """Move `champion` to `candidate` if it still points at `expected_champion`; record the decision."""
    token = uuid.uuid4().hex
    _acquire_lock(client, model, token)
    try:
        current = _champion_version(client, model)
        if current != expected_champion:
            raise UserError(
                f"refused: '{CHAMPION}' of '{model}' moved from {_v(expected_champion)} to {_v(current)} "
                f"while version {candidate.version} was being gated; nothing changed. Re-run to gate "
                f"against the new champion",
                exit_code=EXIT_REFUSED,
            )
        client.set_registered_model_alias(model, CHAMPION, candidate.version)
        record = {
            "promotion/decision": "promoted",
            "promotion/decided_by": decided_by(),
            "promotion/decided_at": _now(),
            "promotion/previous_champion": expected_champion or "none",
            "promotion/gates": json.dumps(
                {r.gate: {"value": r.value, "op": r.op, "threshold": r.threshold, "passed": r.passed} for r in results},
                sort_keys=True,
            ),
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
# The whole promotion, and what `rlhf promote` prints
# ----------------------------------------------------------------------------------------------------------


def promote(
    model: str,
    candidate: str = "challenger",
    gates_path: str | Path = DEFAULT_GATES,
    tracking_uri: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Gate `candidate` of `model` and promote it on success. Returns a JSON-able summary with
    `verdict` in {"promoted", "rejected", "already-champion", "would-promote"}."""
    gates = Gates.load(gates_path)
    client = tracking.client(tracking_uri)
    version = resolve_candidate(client, model, candidate)
    tracking.check_promotable(version)  # its gate values were measured on its own run's model
    champion_v = _champion_version(client, model)
    summary: dict[str, Any] = {
        "model": model,
        "candidate": str(version.version),
        "requested": candidate,
        "champion_before": champion_v,
        "gates_file": str(gates_path),
    }
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


def break_lock(model: str, tracking_uri: str | None = None) -> str | None:
    """`--break-lock`: remove the promotion lock a killed process left; returns who held it (None: no lock)."""
    return remove_lock(tracking.client(tracking_uri), model)


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The decision for a person: one line per gate, then the verdict."""
    lines = [GateResult(**r).line() for r in summary["gates"]]
    model, cand, before = summary["model"], summary["candidate"], summary["champion_before"]
    verdict = summary["verdict"]
    if verdict == "promoted":
        lines.append(f"verdict: PROMOTED {model} version {cand} to '{CHAMPION}' (previous: {_v(before)})")
    elif verdict == "would-promote":
        lines.append(f"verdict: WOULD PROMOTE {model} version {cand} (dry run; nothing changed)")
    elif verdict == "already-champion":
        lines.append(f"verdict: {model} version {cand} is already '{CHAMPION}'; nothing to do")
    else:
        failed = ", ".join(r["gate"] for r in summary["gates"] if not r["passed"])
        lines.append(f"verdict: REJECTED {model} version {cand}: failed {failed}; nothing changed")
    return lines
