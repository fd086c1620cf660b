"""`rlhf promote` against a real MLflow server with real registered versions."""

from __future__ import annotations

import json
import threading
from datetime import datetime

import pytest

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ops import promote as promote_mod

from .conftest import register_version, snapshot

GOOD = {
    "rm/accuracy": 0.72,
    "eval/kl": 4.0,
    "eval/win_rate": 0.61,
    "eval/judge_win_rate": 0.58,
    "eval/reward_mean": 1.5,
}
CHAMP = {
    "rm/accuracy": 0.70,
    "eval/kl": 3.0,
    "eval/win_rate": 0.58,
    "eval/judge_win_rate": 0.56,
    "eval/reward_mean": 1.2,
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the setup printed (MLflow's "View run" lines)
    with pytest.raises(SystemExit) as exc:
        main(["promote", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture()
def with_champion(client, model_name, tmp_path):
    """Model with champion v1 and a passing challenger v2."""
    v1 = register_version(client, model_name, tags=CHAMP, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "champion", v1)
    v2 = register_version(client, model_name, tags=GOOD, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "challenger", v2)
    return v1, v2


def test_pass_moves_champion_and_records_decision(client, model_name, with_champion, capsys, monkeypatch):
    v1, v2 = with_champion
    monkeypatch.setenv("GITHUB_ACTOR", "release-bot")
    code, out, err = run_cli(capsys, "--model-name", model_name)
    assert code == 0, err
    lines = out.strip().splitlines()
    gates = ["rm/accuracy", "eval/kl", "eval/win_rate", "eval/judge_win_rate", "eval/reward_mean"]
    assert [line.split()[0] for line in lines[:5]] == gates
    assert all(line.rstrip().split("(")[0].split()[-1] == "pass" for line in lines[:5])
    assert "0.5800 >= 0.5500" in lines[3]
    assert "0.7200 >= 0.6000" in lines[0] and "4.0000 <= 10.0000" in lines[1]
    assert lines[-1].startswith(f"verdict: PROMOTED {model_name} version {v2}")

    assert client.get_model_version_by_alias(model_name, "champion").version == v2
    tags = client.get_model_version(model_name, v2).tags
    assert tags["promotion/decision"] == "promoted"
    assert tags["promotion/decided_by"] == "release-bot"
    assert tags["promotion/previous_champion"] == v1
    assert datetime.fromisoformat(tags["promotion/decided_at"]).utcoffset().total_seconds() == 0
    gates = json.loads(tags["promotion/gates"])
    assert gates["eval/reward_mean"] == {"value": 1.5, "op": ">=", "threshold": 1.2, "passed": True}
    assert client.get_model_version(model_name, v1).tags["promotion/superseded_by"] == v2
    assert snapshot(client, model_name)["locks"] == []  # the lock was released


@pytest.mark.parametrize(
    "gate,value",
    [
        ("rm/accuracy", 0.59),  # below rm_accuracy_min 0.60
        ("eval/kl", 10.5),  # above kl_max 10
        ("eval/win_rate", 0.50),  # below win_rate_min 0.55
        ("eval/judge_win_rate", 0.54),  # below judge_win_rate_min 0.55: the proxy alone does not promote
        ("eval/reward_mean", 1.19),  # below the champion's 1.2
        ("eval/win_rate", "n/a"),  # not a number: fails closed
    ],
)
def test_each_failing_gate_rejects_and_changes_nothing(client, model_name, tmp_path, capsys, gate, value):
    v1 = register_version(client, model_name, tags=CHAMP, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "champion", v1)
    v2 = register_version(client, model_name, tags={**GOOD, gate: value}, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "challenger", v2)
    before = snapshot(client, model_name)

    code, out, _ = run_cli(capsys, "--model-name", model_name)

    assert code == 1
    failed = [line.split()[0] for line in out.splitlines() if " FAIL " in line]
    assert failed == [gate]
    assert out.strip().splitlines()[-1].startswith(f"verdict: REJECTED {model_name} version {v2}: failed {gate}")
    assert snapshot(client, model_name) == before


def test_missing_value_fails_closed(client, model_name, tmp_path, capsys):
    tags = {k: v for k, v in GOOD.items() if k != "eval/kl"}
    v1 = register_version(client, model_name, tags=tags, tmp_path=tmp_path)
    before = snapshot(client, model_name)
    code, out, err = run_cli(capsys, "--model-name", model_name, "--candidate", v1)
    assert code == 1, err
    assert "eval/kl" in out and "missing" in out
    assert snapshot(client, model_name) == before


def test_values_fall_back_to_source_run_metrics(client, model_name, tmp_path, capsys):
    v1 = register_version(client, model_name, metrics=GOOD, tmp_path=tmp_path)  # no tags at all
    code, out, err = run_cli(capsys, "--model-name", model_name, "--candidate", v1)
    assert code == 0, err
    assert out.count("(run metric") == 5


def test_first_promotion_without_champion_passes_reward_gate(client, model_name, tmp_path, capsys):
    v1 = register_version(client, model_name, tags=GOOD, tmp_path=tmp_path)
    client.set_registered_model_alias(model_name, "challenger", v1)
    code, out, err = run_cli(capsys, "--model-name", model_name, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["verdict"] == "promoted" and summary["champion_before"] is None
    reward = next(g for g in summary["gates"] if g["gate"] == "eval/reward_mean")
    assert reward["passed"] and "no champion yet" in reward["source"]
    assert client.get_model_version(model_name, v1).tags["promotion/previous_champion"] == "none"
    assert client.get_model_version_by_alias(model_name, "champion").version == v1


def test_already_champion_is_a_noop(client, model_name, with_champion, capsys):
    v1, _ = with_champion
    before = snapshot(client, model_name)
    code, out, _ = run_cli(capsys, "--model-name", model_name, "--candidate", v1)
    assert code == 0 and "already 'champion'" in out
    assert snapshot(client, model_name) == before


def test_dry_run_changes_nothing(client, model_name, with_champion, capsys):
    before = snapshot(client, model_name)
    code, out, _ = run_cli(capsys, "--model-name", model_name, "--dry-run")
    assert code == 0 and "WOULD PROMOTE" in out
    assert snapshot(client, model_name) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--candidate", "99"], "version '99' of model '{m}' not found"),
        (["--candidate", "staging"], "alias 'staging' of model '{m}' not found"),
    ],
)
def test_unknown_candidate_is_one_line_error(client, model_name, with_champion, capsys, args, message):
    code, out, err = run_cli(capsys, "--model-name", model_name, *args)
    assert code == 2 and out == ""
    assert err == f"rlhf promote: error: {message.format(m=model_name)}\n"


def test_unknown_model_is_one_line_error(client, capsys):
    code, _, err = run_cli(capsys, "--model-name", "no-such-model")
    assert code == 2 and err == "rlhf promote: error: registered model 'no-such-model' not found\n"


def test_unreachable_server_is_one_line_error(capsys):
    from .conftest import free_port

    code, _, err = run_cli(capsys, "--model-name", "m", "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and err.count("\n") == 1 and "is unreachable" in err


def test_invalid_gates_file_is_one_line_error(client, tmp_path, capsys):
    gates = tmp_path / "gates.yaml"
    gates.write_text("rm_accuracy_min: 1.5\nkl_max: 3\nwin_rate_min: 0.5\n")
    code, _, err = run_cli(capsys, "--model-name", "m", "--gates", str(gates))
    assert code == 2 and err.count("\n") == 1 and "rm_accuracy_min" in err


def test_champion_moved_during_gating_is_refused(client, model_name, with_champion, tmp_path, monkeypatch):
    """Compare-and-set: another promotion lands between our comparison and our commit."""
    v1, v2 = with_champion
    v3 = register_version(client, model_name, tags={**GOOD, "eval/reward_mean": 2.0}, tmp_path=tmp_path)
    real_acquire = promote_mod._acquire_lock

    def interleave(c, model, token):
        monkeypatch.setattr(promote_mod, "_acquire_lock", real_acquire)  # the inner promotion runs normally
        assert promote_mod.promote(model, v3)["verdict"] == "promoted"
        real_acquire(c, model, token)

    monkeypatch.setattr(promote_mod, "_acquire_lock", interleave)
    before = snapshot(client, model_name)  # includes nothing from v3's promotion yet
    with pytest.raises(UserError) as exc:
        promote_mod.promote(model_name, v2)
    assert exc.value.exit_code == 3
    assert f"moved from version {v1} to version {v3}" in str(exc.value)
    after = snapshot(client, model_name)
    assert after["aliases"]["champion"] == v3
    assert after["tags"][v2] == before["tags"][v2]  # the refused candidate carries no decision
    assert after["tags"][v3]["promotion/previous_champion"] == v1
    assert after["locks"] == []


def test_two_promotions_racing_exactly_one_wins(client, model_name, with_champion, tmp_path, monkeypatch):
    """Two real concurrent promotions, both gated against the same champion before either commits."""
    v1, v2 = with_champion
    v3 = register_version(client, model_name, tags={**GOOD, "eval/reward_mean": 1.7}, tmp_path=tmp_path)
    barrier = threading.Barrier(2, timeout=60)
    real_acquire = promote_mod._acquire_lock

    def acquire_after_both_gated(c, model, token):
        barrier.wait()  # both have read champion v1 and passed every gate
        real_acquire(c, model, token)

    monkeypatch.setattr(promote_mod, "_acquire_lock", acquire_after_both_gated)
    outcomes: dict[str, object] = {}

    def attempt(version: str) -> None:
        try:
            outcomes[version] = promote_mod.promote(model_name, version)["verdict"]
        except UserError as exc:
            outcomes[version] = exc

    threads = [threading.Thread(target=attempt, args=(v,)) for v in (v2, v3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    winners = [v for v, o in outcomes.items() if o == "promoted"]
    losers = [o for o in outcomes.values() if isinstance(o, UserError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    loser = losers[0]
    assert loser.exit_code == 3
    # Refused either at the lock (still held) or by compare-and-set (already released, champion moved).
    assert "in progress" in str(loser) or f"moved from version {v1} to version {winners[0]}" in str(loser)
    final = snapshot(client, model_name)
    assert final["aliases"]["champion"] == winners[0]
    assert final["tags"][winners[0]]["promotion/previous_champion"] == v1
    loser_version = ({v2, v3} - set(winners)).pop()
    assert "promotion/decision" not in final["tags"][loser_version]
    assert final["locks"] == []


def test_held_lock_refuses_then_break_lock_recovers(client, model_name, with_champion, capsys):
    _, v2 = with_champion
    client.create_registered_model(model_name + ".promotion-lock", tags={"promotion/locked_by": "ci-42"})
    before = snapshot(client, model_name)
    code, _, err = run_cli(capsys, "--model-name", model_name)
    assert code == 3 and "another promotion" in err and "ci-42" in err and err.count("\n") == 1
    assert snapshot(client, model_name) == before

    code, out, _ = run_cli(capsys, "--model-name", model_name, "--break-lock")
    assert code == 0 and "ci-42" in out
    code, _, err = run_cli(capsys, "--model-name", model_name)
    assert code == 0, err
    assert client.get_model_version_by_alias(model_name, "champion").version == v2
