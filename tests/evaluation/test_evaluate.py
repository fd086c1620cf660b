"""rlhf evaluate on tiny models: per-model metrics, SFT-vs-itself sanity (KL 0, win-rate 0.5), outputs, MLflow
metrics, and the gate tags on registered policy versions (by models:/ URI and by a stage dir's registration)."""

from __future__ import annotations

import json

import pytest

from rlhf_pipeline.cli import main
from rlhf_pipeline.evaluation.metrics import win_rate
from rlhf_pipeline.results import RegisteredVersion, StageResult


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def _register(name: str, local_dir) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(local_dir), "model")
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:
            pass
        version = client.create_model_version(name, source=mlflow.get_artifact_uri("model"), run_id=run.info.run_id)
    return f"models:/{name}/{version.version}"


def test_evaluate_sft_against_policies(
    tiny_model_dir, reward_dir, judge_dir, changed_policy_dir, eval_data_dir, tmp_path, mlflow_sqlite, capsys
):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_sqlite)
    ppo_uri = _register("rlhf-policy", changed_policy_dir / "merged")
    # a stage output dir that records its own registration, as `rlhf dpo` writes it
    dpo_uri = _register("rlhf-policy", changed_policy_dir / "merged")
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    (dpo_dir / "merged").symlink_to(changed_policy_dir / "merged")
    name, version = dpo_uri.removeprefix("models:/").split("/")
    StageResult.of(
        "dpo", "trained", dpo_dir, {}, registered=[RegisteredVersion(name=name, version=version, uri=dpo_uri)]
    ).write()

    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--reward-model",
                str(reward_dir),
                "--data",
                str(eval_data_dir),
                "--output",
                str(out),
                "--policy",
                f"ppo={ppo_uri}",
                "--policy",
                f"dpo={dpo_dir}",
                "--policy",
                f"same={tiny_model_dir}",
                "--max-questions",
                "4",
                "--max-new-tokens",
                "8",
                "--batch-size",
                "3",
                "--judge-model",
                str(judge_dir),
                "--best-of-n",
                "4",
            ]
        )
    assert exc.value.code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    result = StageResult.read(out)
    assert (result.stage, result.status, result.registered) == ("evaluate", "evaluated", [])
    assert json.loads(capsys.readouterr().out) == result.model_dump(mode="json")  # the CLI prints the result
    assert sorted(result.tagged_versions) == sorted([ppo_uri, dpo_uri])
    models = metrics["models"]
    assert set(models) == {"sft", "ppo", "dpo", "same"}
    assert models["sft"]["kl"] == 0.0 and models["sft"]["win_rate"] == 0.5
    # the SFT model evaluated as a "policy": same answers (greedy), so KL 0 and only ties
    assert models["same"]["kl"] == pytest.approx(0.0, abs=1e-4) and models["same"]["win_rate"] == 0.5
    assert models["same"]["reward_mean"] == pytest.approx(models["sft"]["reward_mean"], abs=1e-5)
    # a changed policy drifts from SFT: positive KL on its own greedy answers
    assert models["ppo"]["kl"] > 0.0
    assert models["ppo"] == pytest.approx(models["dpo"])  # same weights, same settings, same numbers
    assert metrics["eval/ppo/win_rate"] == models["ppo"]["win_rate"]
    # the challenger: the highest judge win-rate vs SFT, lower KL on a tie; its gate values flat
    best = max(("ppo", "dpo", "same"), key=lambda n: (models[n]["judge_win_rate"], -models[n]["kl"]))
    assert metrics["challenger"] == metrics["policy"] == best and metrics["eval/kl"] == models[best]["kl"]

    # the judge scores every answer: SFT against itself and the unchanged policy tie everywhere
    for name in ("sft", "same"):
        assert models[name]["judge_win_rate"] == 0.5 and models[name]["judge_win_rate_lc"] == 0.5
        assert models[name]["judge_win_low"] < 0.5 < models[name]["judge_win_high"]
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    judge_of = {(line["model"], line["question"]): line["judge"] for line in lines}
    ppo_judge = [judge_of[("ppo", q)] for q in dict.fromkeys(line["question"] for line in lines)]
    assert models["ppo"]["judge_reward_mean"] == pytest.approx(sum(ppo_judge) / 4)
    sft_judge = [judge_of[("sft", q)] for q in dict.fromkeys(line["question"] for line in lines)]
    assert models["ppo"]["judge_reward_gain"] == pytest.approx((sum(ppo_judge) - sum(sft_judge)) / 4)
    assert [judge_of[k] for k in judge_of] != [line["reward"] for line in lines]  # the judge is not the proxy
    # wins / ties / losses by the judge, per question, against SFT's answer to the same question
    asked = list(dict.fromkeys(line["question"] for line in lines))
    pairs = [(judge_of[("ppo", q)], judge_of[("sft", q)]) for q in asked]
    counted = (sum(p > s for p, s in pairs), sum(p == s for p, s in pairs), sum(p < s for p, s in pairs))
    assert (models["ppo"]["judge_wins"], models["ppo"]["judge_ties"], models["ppo"]["judge_losses"]) == counted
    assert models["ppo"]["n"] == 4 and models["same"]["judge_ties"] == 4

    # best-of-n from 4 SFT samples: n = 1 is SFT sampled (KL 0), KL grows with n and stays under the bound
    bon = metrics["best_of_n"]
    assert [r["n"] for r in bon] == [1, 2, 4] and metrics["best_of_n_questions"] == 4
    assert bon[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < bon[1]["kl"] <= bon[1]["kl_bound"] + 1e-9 and bon[1]["kl"] <= bon[2]["kl"] <= bon[2]["kl_bound"]
    assert bon[0]["reward_mean"] <= bon[1]["reward_mean"] <= bon[2]["reward_mean"]  # the proxy picks
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(lines) == 4 * 4 and {line["model"] for line in lines} == set(models)
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == "## Did it help?"  # the headline first: each policy vs SFT
    wins, ties, losses = counted
    assert f"judged on 4 questions: win-rate {models['ppo']['judge_win_rate']:.3f} [" in report
    assert f"{wins} wins / {ties} ties / {losses} losses" in report
    assert "| ppo |" in report and "## Sample generations" in report and "![KL frontier](frontier.png)" in report
    assert f"{models['ppo']['judge_win_rate']:.3f} [{models['ppo']['judge_win_low']:.3f}," in report

    client = MlflowClient()
    for uri in (ppo_uri, dpo_uri):
        name, version = uri.removeprefix("models:/").split("/")
        tags = client.get_model_version(name, version).tags
        assert float(tags["eval/reward_mean"]) == pytest.approx(models["ppo"]["reward_mean"])
        assert float(tags["eval/kl"]) == pytest.approx(models["ppo"]["kl"])
        assert float(tags["rm/accuracy"]) == 0.75 and "eval/win_rate" in tags
        assert float(tags["eval/judge_win_rate"]) == pytest.approx(models["ppo"]["judge_win_rate"])
    runs = mlflow.search_runs(experiment_names=["rlhf-pipeline"], filter_string="tags.`rlhf.stage` = 'evaluate'")
    run_id = runs.iloc[0]["run_id"]
    # one MLflow metric per column, a step per model (the index -> name map logged next to it): SFT and the
    # policies are points of the same chart
    index = mlflow.artifacts.load_dict(f"runs:/{run_id}/eval/models.json")
    assert list(index.values()) == list(models) and index["0"] == "sft"
    kl_points = {m.step: m.value for m in client.get_metric_history(run_id, "eval/models/kl")}
    assert kl_points == {int(i): pytest.approx(models[name]["kl"]) for i, name in index.items()}
    bon_kl = {m.step: m.value for m in client.get_metric_history(run_id, "eval/best_of_n/kl")}
    assert bon_kl == {1: pytest.approx(bon[0]["kl"]), 2: pytest.approx(bon[1]["kl"]), 4: pytest.approx(bon[2]["kl"])}
    assert "metrics.eval/ppo/kl" not in runs.columns  # no one-bar chart per (model, column)
    artifacts = [f.path for f in client.list_artifacts(run_id, "eval")]
    for png in ("eval/frontier.png", "eval/reward_distributions.png", "eval/comparison.png"):
        assert png in artifacts, artifacts


def test_pipeline_wiring_bare_policy_dir_and_sft_model_field(tiny_model_dir, changed_policy_dir):
    """What the pipeline passes (orchestration.steps.evaluate_wiring): sft_model and one bare policy path."""
    from rlhf_pipeline.evaluation.evaluate import EvaluateConfig

    cfg = EvaluateConfig(
        data="d", output="o", reward_model="r", sft_model=str(tiny_model_dir), policy=str(changed_policy_dir / "merged")
    )
    assert cfg.policies() == {"policy": str(changed_policy_dir / "merged")}


def test_bad_policy_spec_is_one_line(tiny_model_dir, reward_dir, eval_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--reward-model",
                str(reward_dir),
                "--data",
                str(eval_data_dir),
                "--output",
                str(tmp_path / "e"),
                "--policy",
                "=nameless",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=DIR_OR_URI" in err[0]


def test_kept_checkpoints_are_frontier_points(
    tiny_model_dir, reward_dir, ppo_stage_with_checkpoints, eval_data_dir, tmp_path, mlflow_sqlite
):
    """--checkpoints: every kept checkpoint but the last is evaluated as <name>:step-N, never the challenger."""
    from rlhf_pipeline.evaluation.evaluate import EvaluateConfig, run_evaluate

    stage = ppo_stage_with_checkpoints[0]
    result = run_evaluate(
        EvaluateConfig(
            model=str(tiny_model_dir),
            reward_model=str(reward_dir),
            data=str(eval_data_dir),
            output=str(tmp_path / "eval"),
            policy=[f"ppo={stage}"],
            checkpoints=True,
            max_questions=3,
            max_new_tokens=6,
            tracking_uri=mlflow_sqlite,
        )
    )
    models = result.metrics["models"]
    assert set(models) == {"sft", "ppo", "ppo:step-5"} and result.metrics["challenger"] == "ppo"
    assert models["ppo:step-5"]["kl"] > 0 and models["ppo:step-5"]["kl"] != pytest.approx(models["ppo"]["kl"])


def test_judge_by_registered_uri_downloads_a_loadable_reward_model(judge_dir, tmp_path, mlflow_sqlite):
    import mlflow

    from rlhf_pipeline.errors import UserError
    from rlhf_pipeline.evaluation.models import resolve_judge
    from rlhf_pipeline.ppo.rewards import read_reward_model_dir

    mlflow.set_tracking_uri(mlflow_sqlite)
    uri = _register("rlhf-judge", judge_dir / "merged")
    local = resolve_judge(uri, tmp_path)
    assert read_reward_model_dir(local).merged_dir.joinpath("config.json").is_file()
    assert resolve_judge(str(judge_dir), tmp_path) == str(judge_dir)  # a directory is used as it is
    with pytest.raises(UserError, match="cannot download the judge model models:/rlhf-judge/99"):
        resolve_judge("models:/rlhf-judge/99", tmp_path)
