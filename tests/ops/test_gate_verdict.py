"""The gates' verdict the run summary and report print: what `rlhf promote` would decide, nothing changed."""

from __future__ import annotations

from rlhf_pipeline.ops.gates import verdict
from tests.ops.conftest import register_version

PASSING = {
    "rm/accuracy": 0.7,
    "eval/kl": 1.0,
    "eval/win_rate": 0.6,
    "eval/judge_win_rate": 0.6,
    "eval/reward_mean": 0.2,
}


def test_verdict_names_the_failed_gate_and_moves_no_alias(client, model_name, tmp_path):
    version = register_version(client, model_name, tags={**PASSING, "eval/win_rate": 0.5}, tmp_path=tmp_path)
    result = verdict(client, model_name, version)
    assert (result["model"], result["version"], result["gates_file"]) == (model_name, version, "ops/default_gates.yaml")
    by_gate = {r["gate"]: r for r in result["results"]}
    assert set(by_gate) == {"rm/accuracy", "eval/kl", "eval/win_rate", "eval/judge_win_rate", "eval/reward_mean"}
    assert [g for g, r in by_gate.items() if not r["passed"]] == ["eval/win_rate"]
    assert (by_gate["eval/win_rate"]["value"], by_gate["eval/win_rate"]["threshold"]) == (0.5, 0.55)
    assert client.get_registered_model(model_name).aliases == {}  # a dry run


def test_verdict_against_the_champion(client, model_name, tmp_path):
    champion = register_version(client, model_name, tags={**PASSING, "eval/reward_mean": 0.5}, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "champion", champion)
    candidate = register_version(client, model_name, tags=PASSING, tmp_path=tmp_path)
    rows = {r["gate"]: r for r in verdict(client, model_name, candidate)["results"]}
    assert not rows["eval/reward_mean"]["passed"] and rows["eval/reward_mean"]["threshold"] == 0.5
    # the champion itself has nothing to beat
    rows = {r["gate"]: r for r in verdict(client, model_name, champion)["results"]}
    assert all(r["passed"] for r in rows.values())
