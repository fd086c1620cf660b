"""The report step: alias `challenger` on this run's policy version, headline metrics, Markdown + HTML report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.ops.gates import verdict
from rlhf_pipeline.orchestration import report as rep
from rlhf_pipeline.orchestration import steps
from rlhf_pipeline.results import RegisteredVersion, StageResult


class Art(SimpleNamespace):
    """Stands in for a kfp Artifact: path, metadata, log_metric."""

    def __init__(self, path, metadata=None):
        super().__init__(path=str(path), metadata=dict(metadata or {}))

    def log_metric(self, name, value):
        self.metadata[name] = value


def register(client, name, run_key, tags=None):
    import mlflow

    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    with mlflow.start_run() as run:
        mlflow.log_dict({"x": 1}, "model/x.json")
    return client.create_model_version(
        name,
        source=f"runs:/{run.info.run_id}/model",
        run_id=run.info.run_id,
        tags={"kfp_run_id": run_key, **(tags or {})},
    )


@pytest.fixture()
def store(tmp_path, mlflow_sqlite):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_sqlite)
    mlflow.set_experiment("t")
    return MlflowClient(tracking_uri=mlflow_sqlite)


def model_artifact(tmp_path, step, metrics, registered=None):
    out = tmp_path / "work" / step
    out.mkdir(parents=True)
    versions = (
        [RegisteredVersion(uri=f"models:/{registered['name']}/{registered['version']}", **registered)]
        if registered
        else []
    )
    result = StageResult.of(step, "trained", out, metrics, registered=versions)
    result.write()
    art = Art(tmp_path / "kfp" / step / "model")
    steps.publish(step, out, art, Art(tmp_path / "kfp" / step / "metrics"), result)
    return art


def _report_of_run_7(tmp_path, store, mlflow_sqlite, frontier: bytes | None = None, injected_run: str | None = None):
    """Registered versions of run-7 (and of other runs), the steps' artifacts, and the report step on them (in a
    task whose MLflow run was injected as $MLFLOW_RUN_ID, if `injected_run`)."""
    register(store, "rlhf-policy", "older-run")
    sft_v = register(store, "rlhf-sft", "run-7")
    rm_v = register(store, "rlhf-reward", "run-7")
    pol_v = register(store, "rlhf-policy", "run-7", {"algorithm": "ppo"})
    register(store, "rlhf-policy", "another-run")  # newer, but not this run's
    sft = model_artifact(tmp_path, "sft", {"train_loss": 2.5}, {"name": "rlhf-sft", "version": sft_v.version})
    rm = model_artifact(tmp_path, "reward", {"accuracy": 0.75}, {"name": "rlhf-reward", "version": rm_v.version})
    policy = model_artifact(tmp_path, "ppo", {"kl_last": 0.1, "reward_last": 0.3})  # registry entry unknown
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    (gen_dir / "generations.jsonl").write_text(
        "\n".join(
            json.dumps(row)
            for i in range(6)
            for row in (
                {"question": f"Which beer {i}?", "model": "sft", "response": "An ale.", "reward": 0.1, "kl": 0.0},
                {"question": f"Which beer {i}?", "model": "ppo", "response": "A stout <b>.", "reward": 0.4, "kl": 0.3},
            )
        )
    )
    if frontier is not None:
        (gen_dir / "frontier.png").write_bytes(frontier)
    (tmp_path / "eval.md").write_text("Evaluation text")
    summary = Art(tmp_path / "summary")
    md, html = Art(tmp_path / "report.md"), Art(tmp_path / "report.html")
    if injected_run:
        os.environ["MLFLOW_RUN_ID"] = injected_run  # (after the registrations: start_run() would resume it)
    result = rep.run_report_step(
        models={"sft": sft, "reward": rm, "policy": policy},
        eval_metrics=Art(tmp_path / "em", {"eval/reward_mean": 0.4, "eval/kl": 0.2, "eval/win_rate": 0.6}),
        generations=Art(gen_dir),
        eval_report=Art(tmp_path / "eval.md"),
        alignment="ppo",
        summary=summary,
        report_md=md,
        report_html=html,
        tracking_uri=mlflow_sqlite,
        registered_model_prefix="rlhf",
        kfp_run_id="run-7",
        num_samples=2,
        alias="challenger",
        check_gates=verdict,
    )
    return result, pol_v, summary, md, html


def test_report_points_challenger_and_renders(tmp_path, store, mlflow_sqlite):
    result, pol_v, summary, md, html = _report_of_run_7(tmp_path, store, mlflow_sqlite)
    assert store.get_model_version_by_alias("rlhf-policy", "challenger").version == pol_v.version
    assert result["challenger"] == f"rlhf-policy/{pol_v.version}"
    # the gates' verdict on the challenger version (it carries no gate tags here: every gate fails closed)
    assert [r["passed"] for r in result["gates"]["results"]] == [False] * 5
    assert summary.metadata == {"rm/accuracy": 0.75, "eval/reward_mean": 0.4, "eval/kl": 0.2, "eval/win_rate": 0.6}
    text = Path(md.path).read_text()
    assert "| rm/accuracy | 0.75 |" in text and "Which beer 1?" in text and "Which beer 2?" not in text
    assert "Evaluation text" in text and "challenger" in text
    assert f"ops/default_gates.yaml) on rlhf-policy v{pol_v.version}: FAIL: rm/accuracy missing" in text
    assert "**ppo** (reward 0.4, kl 0.3)" in text and "An ale." in text
    page = Path(html.path).read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page
    assert "A stout &lt;b&gt;." in page  # generated text is escaped, never markup


def test_on_kubeflow_the_report_goes_to_the_pipeline_run_too(tmp_path, store, mlflow_sqlite):
    """The 2.17 plugin's layout: a pipeline run, the report task's nested run injected as $MLFLOW_RUN_ID. The
    report, the HTML page and the frontier it embeds land under report/ of the PIPELINE run, with their names."""
    import mlflow

    experiment = store.get_experiment_by_name("t").experiment_id
    pipeline = store.create_run(experiment, run_name="kfp pipeline run")
    task = store.create_run(experiment, tags={"mlflow.parentRunId": pipeline.info.run_id}, run_name="report")
    png = b"\x89PNG\r\n\x1a\n not really a picture"
    _, _, _, md, _ = _report_of_run_7(tmp_path, store, mlflow_sqlite, frontier=png, injected_run=task.info.run_id)
    logged = {a.path for a in store.list_artifacts(pipeline.info.run_id, "report")}
    assert logged == {"report/report.md", "report/report.html", "report/frontier.png"}
    local = Path(mlflow.artifacts.download_artifacts(run_id=pipeline.info.run_id, artifact_path="report"))
    assert (local / "report.md").read_text() == Path(md.path).read_text()
    assert (local / "frontier.png").read_bytes() == png
    assert store.list_artifacts(task.info.run_id) == []  # not on the task's run


def test_without_an_injected_run_the_report_step_logs_no_report(tmp_path, store, mlflow_sqlite):
    """`rlhf run` (no $MLFLOW_RUN_ID): its own parent run gets the report at the end, not from this step."""
    experiment = store.get_experiment_by_name("t").experiment_id
    before = {r.info.run_id for r in store.search_runs([experiment])}
    _report_of_run_7(tmp_path, store, mlflow_sqlite)
    runs = [r for r in store.search_runs([experiment]) if r.info.run_id not in before]
    assert runs and all(store.list_artifacts(r.info.run_id, "report") == [] for r in runs)


def test_no_policy_version_is_an_error(tmp_path, store, mlflow_sqlite):
    sft = model_artifact(tmp_path, "sft", {})
    rm = model_artifact(tmp_path, "reward", {})
    policy = model_artifact(tmp_path, "dpo", {})
    with pytest.raises(UserError, match="no registered policy version"):
        rep.run_report_step(
            models={"sft": sft, "reward": rm, "policy": policy},
            eval_metrics=Art(tmp_path / "em"),
            generations=Art(tmp_path / "none"),
            eval_report=Art(tmp_path / "none.md"),
            alignment="dpo",
            summary=Art(tmp_path / "s"),
            report_md=Art(tmp_path / "m"),
            report_html=Art(tmp_path / "h"),
            tracking_uri=mlflow_sqlite,
            registered_model_prefix="rlhf",
            kfp_run_id="run-8",
            num_samples=2,
            alias="challenger",
        )


def test_publish_keeps_weights_out_of_the_artifact(tmp_path):
    out = tmp_path / "work"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model.safetensors").write_bytes(b"x" * 1000)
    (out / "merged" / "config.json").write_text("{}")
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"a")
    result = StageResult.of(
        "reward",
        "trained",
        out,
        {"accuracy": 0.6, "nested": {"a": 1}, "flag": True, "history": [1, 2], "adapter_dir": str(out / "adapter")},
        registered=RegisteredVersion.from_entries(
            {"name": "rlhf-reward", "version": 3, "uri": "models:/rlhf-reward/3", "run_id": "r"}
        ),
    )
    result.write()
    art, metrics = Art(tmp_path / "art"), Art(tmp_path / "m")
    values = steps.publish("reward", out, art, metrics)  # the result comes from metrics.json (as after a TrainJob)
    assert values == {"rm/accuracy": 0.6, "rm/nested/a": 1.0, "rm/processes": 1.0}  # no status, no versions
    assert metrics.metadata == values
    step_json = json.loads((Path(art.path) / "step.json").read_text())
    assert step_json["registered"] == [
        {"name": "rlhf-reward", "version": "3", "uri": "models:/rlhf-reward/3", "run_id": "r"}
    ]
    assert (Path(art.path) / "adapter" / "adapter_model.safetensors").is_file()
    assert not (Path(art.path) / "merged").exists()
    assert art.metadata["output_dir"] == str(out) and art.metadata["registered_version"] == "3"
    assert steps.merged_model(art) == str(out / "merged")


def test_publish_reads_registered_versions_exactly(tmp_path):
    """Only `registered` names versions: a metric whose name mentions registration is just a metric."""
    out = tmp_path / "work"
    out.mkdir()
    StageResult.of("dpo", "trained", out, {"registered_count": 2, "dpo/loss": 0.5}).write()
    art = Art(tmp_path / "art")
    values = steps.publish("dpo", out, art, None)
    assert "registered_model" not in art.metadata and values["dpo/registered_count"] == 2.0
    assert steps.registered_versions(None) == [] and steps.read_metrics(tmp_path / "nowhere") is None


def test_publish_refuses_a_metrics_json_that_is_not_a_stage_result(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.6, "registered_model": {"version": 3}}))
    with pytest.raises(UserError, match="is not a stage result"):
        steps.publish("reward", out, Art(tmp_path / "art"), None)


def test_both_alignments_challenger_is_the_one_the_evaluation_named(tmp_path, store, mlflow_sqlite):
    """`alignment: both`: PPO and DPO both registered in this run; the alias follows the evaluation's choice."""
    sft = model_artifact(tmp_path, "sft", {})
    rm = model_artifact(tmp_path, "reward", {})
    ppo_v = register(store, "rlhf-policy", "run-9", {"algorithm": "ppo"})
    dpo_v = register(store, "rlhf-policy", "run-9", {"algorithm": "dpo"})
    ppo = model_artifact(tmp_path, "ppo", {}, {"name": "rlhf-policy", "version": ppo_v.version})
    dpo = model_artifact(tmp_path, "dpo", {}, {"name": "rlhf-policy", "version": dpo_v.version})
    (tmp_path / "eval.md").write_text("side by side")
    eval_report = Art(
        tmp_path / "eval.md", {"challenger": "dpo", "challenger_uri": f"models:/rlhf-policy/{dpo_v.version}"}
    )
    result = rep.run_report_step(
        models={"sft": sft, "reward": rm, "policy": ppo, "second_policy": dpo},
        eval_metrics=Art(tmp_path / "em", {"eval/judge_win_rate": 0.7}),
        generations=Art(tmp_path / "none"),
        eval_report=eval_report,
        alignment="both",
        summary=Art(tmp_path / "s"),
        report_md=Art(tmp_path / "m"),
        report_html=Art(tmp_path / "h"),
        tracking_uri=mlflow_sqlite,
        registered_model_prefix="rlhf",
        kfp_run_id="run-9",
        num_samples=2,
        alias="challenger",
    )
    assert store.get_model_version_by_alias("rlhf-policy", "challenger").version == dpo_v.version
    assert result["challenger"] == f"rlhf-policy/{dpo_v.version}"
    assert {v["version"] for v in result["versions"] if v["name"] == "rlhf-policy"} == {
        str(ppo_v.version),
        str(dpo_v.version),
    }
    assert "| eval/judge_win_rate | 0.7 |" in Path(tmp_path / "m").read_text()
