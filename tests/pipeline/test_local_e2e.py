"""The FULL pipeline through kfp.local (each step in its own process, exactly the component code a cluster runs)
with the tiny model on small subsets of the beer sample: every step's artifacts, the Kubeflow metrics, the MLflow
runs, the registered versions with their lineage, the challenger alias and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline import tracking
from rlhf_pipeline.orchestration import local_run, run_config

pytestmark = pytest.mark.slow

LINEAGE = ("data_hash", "base_model", "git_commit", "config_hash", "kfp_run_id")


def tiny_sizes(model: Path, beer: Path, out: Path, alignment: str, sets: tuple[str, ...] = ()):
    return run_config.load_config(
        None,
        {"model": str(model), "input": str(beer), "output": str(out), "alignment": alignment, "num_threads": 2},
        (
            "prepare_data.finetune_max_pairs=48",
            "prepare_data.reward_max_pairs=64",
            "prepare_data.rl_max_pairs=16",
            "prepare_data.evaluation_max_pairs=16",
            "sft.max_steps=2",
            "sft.seq_length=128",
            "sft.batch_size=2",
            "sft.max_eval_samples=4",
            "reward.max_steps=3",
            "reward.batch_size=2",
            "reward.max_length=512",  # the default split holds out 3 reward questions: their pairs must fit
            "reward.max_eval_samples=8",
            "prepare_data.judge_fraction=0.1",
            "prepare_data.judge_max_pairs=32",
            "judge.max_steps=2",
            "judge.batch_size=2",
            "judge.max_length=256",
            "judge.max_eval_samples=4",
            "ppo.steps=1",
            "ppo.batch_size=4",
            "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=1",
            "ppo.min_new_tokens=8",
            "ppo.max_new_tokens=8",
            "ppo.max_prompt_length=64",
            "dpo.max_steps=2",
            "dpo.batch_size=2",
            "dpo.max_eval_samples=4",
            "evaluate.max_questions=4",
            "evaluate.max_new_tokens=8",
            "evaluate.batch_size=4",
            *sets,
        ),
    )


def executor_output(task_dir: Path) -> dict:
    return json.loads((task_dir / "executor_output.json").read_text())


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_model_dir, beer_posts):
    out = tmp_path_factory.mktemp("e2e") / "outputs"
    cfg = tiny_sizes(tiny_model_dir, beer_posts, out, "ppo")
    summary = local_run.run_local(cfg)
    return cfg, out, summary


def test_every_step_ran_and_was_timed(ppo_run):
    _, _, summary = ppo_run
    steps = list(summary["step_seconds"])
    # kfp.local runs independent tasks (the judge; the reward model and PPO) in either order; the dependencies are fixed
    expected = ["validate config", "prepare data", "SFT", "judge", "reward model", "PPO", "evaluate", "report"]
    assert sorted(steps) == sorted(expected)
    assert steps[:3] == ["validate config", "prepare data", "SFT"] and steps[-2:] == ["evaluate", "report"]
    assert steps.index("reward model") < steps.index("PPO")
    assert all(s > 0 for s in summary["step_seconds"].values())


def test_every_stage_wrote_its_artifacts(ppo_run):
    _, out, summary = ppo_run
    [root] = list((out / "kfp").glob("rlhf-pipeline-*"))
    data = root / "prepare-data" / "data"
    for name in ("finetune.parquet", "reward.parquet", "rl.parquet", "evaluation.parquet", "judge.parquet"):
        assert (data / name).is_file(), name
    assert (data / "stats.json").is_file()
    for step in ("sft", "reward", "judge", "ppo"):
        model = root / step / "model"
        assert (model / "adapter").is_dir() and (model / "metrics.json").is_file(), step
        step_info = json.loads((model / "step.json").read_text())
        # full outputs (merged weights) stay in the work dir, not in the artifact
        assert not (model / "merged").exists()
        assert (Path(step_info["output_dir"]) / "merged" / "config.json").is_file(), step
    assert (root / "evaluate" / "generations" / "generations.jsonl").is_file()
    assert (root / "evaluate" / "report").is_file()
    report = (root / "report" / "report_md").read_text()
    assert "Sample generations" in report
    # it opens with the answer to "did it help?": the policy vs SFT and the gates' verdict on the challenger
    assert report.index("## Did it help?") < report.index("## Headline metrics")
    assert (
        "| ppo (challenger) | 4 |" in report and "(`rlhf promote`, ops/default_gates.yaml) on rlhf-policy v" in report
    )
    assert (root / "report" / "report_html").read_text().startswith("<!doctype html>")
    assert Path(summary["report_md"]).is_file() and Path(summary["report_html"]).is_file()


def test_kubeflow_metrics_were_logged(ppo_run):
    _, out, _ = ppo_run
    [root] = list((out / "kfp").glob("rlhf-pipeline-*"))

    def metrics_of(task, name="metrics"):
        artifacts = executor_output(root / task)["artifacts"][name]["artifacts"]
        return artifacts[0]["metadata"]

    assert metrics_of("prepare-data")["data/pairs/finetune"] > 0
    assert "sft/train_loss" in metrics_of("sft")
    rm = metrics_of("reward")
    assert 0.0 <= rm["rm/accuracy"] <= 1.0 and "rm/reward_std" in rm
    assert {"ppo/kl_last", "ppo/reward_last"} <= set(metrics_of("ppo"))
    ev = metrics_of("evaluate")
    assert {"eval/reward_mean", "eval/kl", "eval/win_rate"} <= set(ev)
    headline = metrics_of("report", "summary")
    assert {"rm/accuracy", "eval/reward_mean", "eval/kl", "eval/win_rate"} <= set(headline)


def test_mlflow_runs_hold_metrics(ppo_run):
    from mlflow.tracking import MlflowClient

    cfg, _, summary = ppo_run
    client = MlflowClient(tracking_uri=cfg.tracking())
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    # one parent run for the pipeline run, every step's run nested under it (prepare-data's too), the report on it
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == tracking.pipeline_run_name(summary["run"]) and parent.info.status == "FINISHED"
    assert summary["mlflow_run_url"].endswith(f"/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    assert sorted(r.info.run_name for r in children) == ["evaluate", "judge", "ppo", "prepare_data", "reward", "sft"]
    by_stage = {r.data.tags.get("rlhf.stage"): r for r in runs}
    assert {"prepare_data", "sft", "reward", "ppo", "evaluate"} <= set(by_stage)
    assert by_stage["prepare_data"].data.metrics["data/pairs_per_subset/finetune"] == 48
    inputs = {d.dataset.name for d in client.get_run(by_stage["sft"].info.run_id).inputs.dataset_inputs}
    assert inputs == {"finetune"}
    assert any(k.startswith("sft/") for k in by_stage["sft"].data.metrics)
    assert "rm/accuracy" in by_stage["reward"].data.metrics
    assert any(k.startswith("ppo/") for k in by_stage["ppo"].data.metrics)
    assert any(k.startswith("eval/") for k in by_stage["evaluate"].data.metrics)
    # one PPO epoch of one minibatch: the ratio statistics are zeros by construction, so not logged
    assert "ppo/policy_loss" in by_stage["ppo"].data.metrics and "ppo/clipfrac" not in by_stage["ppo"].data.metrics
    figures = {
        "sft": ["sft/curves.png"],
        "reward": ["reward/curves.png"],
        "ppo": ["ppo/curves.png"],
        "evaluate": ["eval/comparison.png", "eval/frontier.png", "eval/reward_distributions.png"],
    }
    for stage, pngs in figures.items():
        folder = pngs[0].split("/")[0]
        logged = [a.path for a in client.list_artifacts(by_stage[stage].info.run_id, folder)]
        assert set(pngs) <= set(logged), (stage, logged)


def test_registered_versions_carry_lineage(ppo_run, beer_posts):
    from mlflow.tracking import MlflowClient

    cfg, out, summary = ppo_run
    client = MlflowClient(tracking_uri=cfg.tracking())
    [root] = list((out / "kfp").glob("rlhf-pipeline-*"))
    input_sha = json.loads((root / "prepare-data" / "data" / "stats.json").read_text())["input_sha256"]
    names = {v["name"] for v in summary["registered"]}
    assert names == {"rlhf-sft", "rlhf-reward", "rlhf-judge", "rlhf-policy"}
    for name in names:
        [mv] = client.search_model_versions(f"name = '{name}' and tags.kfp_run_id = '{summary['run']}'")
        tags = mv.tags
        assert all(tags.get(k) for k in LINEAGE), (name, tags)
        assert tags["data_hash"] == input_sha
        assert tags["git_commit"] != "unknown"
    policy = client.get_model_version_by_alias("rlhf-policy", "challenger")
    assert policy.tags["kfp_run_id"] == summary["run"] and policy.tags.get("algorithm") == "ppo"
    # the evaluation's gate values, which `rlhf promote` reads
    for gate in ("eval/reward_mean", "eval/win_rate", "eval/kl", "eval/judge_win_rate", "rm/accuracy"):
        assert gate in policy.tags, gate


def test_dpo_branch(tmp_path, tiny_model_dir, beer_posts):
    from mlflow.tracking import MlflowClient

    cfg = tiny_sizes(tiny_model_dir, beer_posts, tmp_path / "outputs", "dpo")
    summary = local_run.run_local(cfg)
    steps = list(summary["step_seconds"])
    # kfp.local runs independent tasks (the judge, the reward model) in either order; the dependencies are fixed
    expected = ["validate config", "prepare data", "SFT", "judge", "reward model", "DPO", "evaluate", "report"]
    assert sorted(steps) == sorted(expected)
    assert steps[:2] == ["validate config", "prepare data"] and steps[-2:] == ["evaluate", "report"]
    assert steps.index("SFT") < steps.index("DPO") and steps.index("reward model") < steps.index("DPO")
    policy = MlflowClient(tracking_uri=cfg.tracking()).get_model_version_by_alias("rlhf-policy", "challenger")
    assert policy.tags.get("algorithm") == "dpo" and policy.tags["kfp_run_id"] == summary["run"]


def test_both_branch_evaluates_ppo_and_dpo_side_by_side(tmp_path, tiny_model_dir, beer_posts):
    """`alignment: both`: PPO and DPO from the same SFT and reward model, one evaluate step with the judge, PPO's
    kept checkpoint and a best-of-2 baseline on the frontier, the challenger alias on the evaluation's choice."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_sizes(
        tiny_model_dir,
        beer_posts,
        tmp_path / "outputs",
        "both",
        (
            "ppo.steps=2",
            "ppo.save_steps=1",
            "ppo.keep_checkpoints=2",
            "evaluate.checkpoints=true",
            "evaluate.best_of_n=2",
            "evaluate.do_sample=true",
        ),
    )
    summary = local_run.run_local(cfg)
    assert {"judge", "PPO", "DPO", "evaluate"} <= set(summary["step_seconds"])
    assert sum(1 for step in summary["step_seconds"] if step == "evaluate") == 1
    evaluated = evaluation_result(Path(summary["work_dir"]) / "evaluate")
    models = evaluated["models"]
    assert set(models) == {"sft", "ppo", "ppo:step-1", "dpo"}
    assert all("judge_win_rate" in m for m in models.values())
    challenger = evaluated["challenger"]
    assert challenger in ("ppo", "dpo") and models[challenger]["judge_win_rate"] >= max(
        models[n]["judge_win_rate"] for n in ("ppo", "dpo")
    )
    assert [r["n"] for r in evaluated["best_of_n"]] == [1, 2]
    client = MlflowClient(tracking_uri=cfg.tracking())
    policy = client.get_model_version_by_alias("rlhf-policy", "challenger")
    assert policy.tags.get("algorithm") == challenger and policy.tags["kfp_run_id"] == summary["run"]
    assert client.get_registered_model("rlhf-judge").latest_versions
    report = Path(summary["report_md"]).read_text()
    assert "| ppo:step-1 |" in report and "| dpo |" in report and "judge win-rate" in report
    assert (Path(summary["report_md"]).parent / "frontier.png").is_file()


def evaluation_result(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())
