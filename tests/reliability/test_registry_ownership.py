"""evaluate -> promote never acts on a model version that belongs to another run (issue 18, item 1), through a real
`mlflow server` on 127.0.0.1: evaluate refuses before generating anything and tags nothing; promote refuses a
version whose gate values were measured on another run's model."""

from __future__ import annotations

import uuid

import pytest
from faults import row
from sft_reward_helpers import make_data_dir

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import RegisteredVersion, StageResult
from rlhf_pipeline.tracking import SOURCE_RUN_TAG, check_policy_versions

GOOD = {"rm/accuracy": 0.72, "eval/kl": 4.0, "eval/win_rate": 0.61, "eval/judge_win_rate": 0.6, "eval/reward_mean": 1.5}


@pytest.fixture()
def server(mlflow_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


def register(client, name: str, tmp_path, tags=None) -> tuple[str, str]:
    """A real version of `name` from a real run with a logged artifact: (version, its run id)."""
    experiment = client.get_experiment_by_name("ownership") or None
    exp_id = experiment.experiment_id if experiment else client.create_experiment("ownership")
    run = client.create_run(exp_id)
    artifact = tmp_path / uuid.uuid4().hex[:6]
    artifact.mkdir()
    (artifact / "config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(artifact), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception:
        pass
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version.version, key, str(value))
    return str(version.version), run.info.run_id


def policy_dir(tmp_path, model_dir, name: str, version: str, run_id: str):
    """A DPO stage output as `rlhf dpo` writes it: merged/ and a metrics.json naming its registration and run."""
    out = tmp_path / f"dpo-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    (out / "merged").symlink_to(model_dir)
    entry = RegisteredVersion(name=name, version=version, uri=f"models:/{name}/{version}", run_id=run_id)
    StageResult.of("dpo", "trained", out, {}, registered=[entry]).write()
    return out


@row(
    "evaluate",
    "the policy's metrics.json names a version registered by another run (another store)",
    "2",
    r"policy dpo: models:/.*/1 belongs to run .*, not to run",
    "nothing generated, no tag on the unrelated version",
)
def test_evaluate_refuses_a_policy_whose_version_belongs_to_another_run(server, tiny_model_dir, tmp_path, capsys):
    name = f"rel-{uuid.uuid4().hex[:8]}-policy"
    unrelated, unrelated_run = register(server, name, tmp_path)  # version 1 of another run in THIS store
    # the policy was registered as version 1 by a run of another store
    policy = policy_dir(tmp_path, tiny_model_dir, name, unrelated, run_id="run-in-another-store")
    reward = tmp_path / "reward"
    (reward / "merged").mkdir(parents=True)
    (reward / "merged" / "config.json").write_text("{}")  # never loaded: the check comes first
    StageResult.of("reward", "trained", reward, {"accuracy": 0.7}).write()
    data = make_data_dir(tmp_path / "data")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(
            ["evaluate", "--model", str(tiny_model_dir), "--reward-model", str(reward), "--data", str(data)]
            + ["--output", str(tmp_path / "eval"), "--policy", f"dpo={policy}", "--max-questions", "2"]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"rlhf evaluate: error: policy dpo: models:/{name}/1 belongs to run {unrelated_run}")
    tags = server.get_model_version(name, unrelated).tags
    assert not any(k.startswith("eval/") for k in tags)  # nothing tagged on the unrelated version
    assert not (tmp_path / "eval" / "metrics.json").exists()


@row("evaluate", "--policy models:/name/99 that does not exist", "2", r"is not in the registry", "nothing generated")
def test_a_missing_version_is_refused_before_generation(server, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"policy p: models:/no-such-model/99 is not in the registry"):
        check_policy_versions({"p": "models:/no-such-model/99"})


def test_the_producing_run_passes_and_is_recorded(server, tiny_model_dir, tmp_path):
    name = f"rel-{uuid.uuid4().hex[:8]}-policy"
    version, run_id = register(server, name, tmp_path)
    check_policy_versions({"dpo": str(policy_dir(tmp_path, tiny_model_dir, name, version, run_id))})
    assert server.get_model_version(name, version).tags[SOURCE_RUN_TAG] == run_id


@row(
    "promote",
    "a version whose gate values evaluate measured on another run's model",
    "2",
    r"its gate values were measured on the model of run .*: refusing to promote it",
    "champion alias not moved",
)
def test_promote_refuses_gate_values_measured_on_another_runs_model(server, tmp_path, capsys):
    name = f"rel-{uuid.uuid4().hex[:8]}-policy"
    version, _ = register(server, name, tmp_path, tags={**GOOD, SOURCE_RUN_TAG: "another-run"})
    server.set_registered_model_alias(name, "challenger", version)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["promote", "--model-name", name])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "its gate values were measured on the model of run another-run: refusing to promote it" in err
    assert "champion" not in (server.get_registered_model(name).aliases or {})

    # the same gate values on a version evaluated for its own run: promoted
    good, good_run = register(server, name, tmp_path, tags=GOOD)
    server.set_model_version_tag(name, good, SOURCE_RUN_TAG, good_run)
    server.set_registered_model_alias(name, "challenger", good)
    with pytest.raises(SystemExit) as exc:
        main(["promote", "--model-name", name])
    assert exc.value.code == 0, capsys.readouterr().err
    assert server.get_model_version_by_alias(name, "champion").version == good
