"""prepare-data's MLflow run and the data splits as dataset inputs, through a real `mlflow server`: the stats.json
counts as `data/` metrics, every split written as an input whose digest is the parquet's own sha256, and the
stage that reads a split logging that same split (same digest) with its context."""

from __future__ import annotations

import hashlib
import json

from mlflow.tracking import MlflowClient

from rlhf_pipeline import tracking
from rlhf_pipeline.data.config import PrepareDataConfig
from rlhf_pipeline.data.prepare import run_prepare_data
from rlhf_pipeline.tracking import TrackingOptions, stage_run


def _inputs(client, run_id):
    """name -> (digest, context, sha256 tag, row count) of a run's dataset inputs."""
    out = {}
    for dataset_input in client.get_run(run_id).inputs.dataset_inputs:
        tags = {t.key: t.value for t in dataset_input.tags}
        ds = dataset_input.dataset
        out[ds.name] = (ds.digest, tags["mlflow.data.context"], tags["sha256"], json.loads(ds.profile)["num_rows"])
    return out


def test_prepare_data_run_holds_its_counts_and_splits(tmp_path, beer_posts, mlflow_server, monkeypatch):
    import pandas as pd

    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    parent = tracking.start_pipeline_run(mlflow_server, "data-runs", "rlhf-pipeline test", {})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.run_id)
    data = tmp_path / "data"
    cfg = PrepareDataConfig(
        input=str(beer_posts), output=str(data), finetune_max_pairs=40, reward_max_pairs=30, rl_max_pairs=8
    )
    stats = run_prepare_data(cfg).metrics

    client = MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([parent.experiment_id], filter_string="tags.`rlhf.stage` = 'prepare_data'")
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.run_name == "prepare_data"
    metrics = run.data.metrics
    assert metrics["data/pairs_total"] == stats["pairs_total"] == sum(stats["pairs_per_subset"].values())
    assert metrics["data/posts_read"] == stats["posts_read"] > 0
    for subset, pairs in stats["pairs_per_subset"].items():
        assert metrics[f"data/pairs_per_subset/{subset}"] == pairs
        assert metrics[f"data/questions_per_subset/{subset}"] == stats["questions_per_subset"][subset]
    assert (
        metrics["data/questions_skipped/fewer_than_two_answers"] == stats["questions_skipped"]["fewer_than_two_answers"]
    )
    assert run.data.tags["rlhf.data_hash"] == "unknown"  # its own input is the dump, not a prepared dir

    splits = sorted(p.stem for p in data.glob("*.parquet"))
    assert splits == ["evaluation", "finetune", "judge", "reward", "rl"]  # judge: written, empty
    logged = _inputs(client, run.info.run_id)
    assert sorted(logged) == splits
    for name in splits:
        path = data / f"{name}.parquet"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert logged[name] == (sha[:32], "output", sha, len(pd.read_parquet(path)))
    assert logged["finetune"][3] == stats["pairs_per_subset"]["finetune"] == 40 and logged["judge"][3] == 0

    # a stage reading a split: the same dataset (same digest), its own context
    with stage_run(TrackingOptions(tracking_uri=mlflow_server), "sft", data_dir=data) as sft:
        sft.log_input(data, "finetune", "training")
        sft.log_input(tmp_path / "elsewhere", "finetune", "training")  # no such split there: nothing logged
    assert {k: v[:2] for k, v in _inputs(client, sft.run_id).items()} == {
        "finetune": (logged["finetune"][0], "training")
    }
    assert client.get_run(sft.run_id).data.tags["rlhf.data_hash"] == stats["input_sha256"]


def test_prepare_data_without_a_tracking_target_writes_no_store(tmp_path, beer_posts, monkeypatch):
    """Standalone `rlhf prepare-data` without $MLFLOW_TRACKING_URI: no ./mlflow.db appears where it runs."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID", tracking.PARENT_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    run_prepare_data(PrepareDataConfig(input=str(beer_posts), output=str(tmp_path / "data"), rl_max_pairs=4))
    assert (tmp_path / "data" / "rl.parquet").is_file()
    assert not list(tmp_path.glob("mlflow.db*")) and not (tmp_path / "mlartifacts").exists()


def test_stdout_holds_only_the_json_summary_when_tracking_to_a_server(
    tmp_path, beer_posts, mlflow_server, capsys, monkeypatch
):
    """MLflow writes "View run ... at: URL" to stdout when a run against a server ends: a stage's stdout is its
    JSON summary, which a script pipes into jq."""
    import pytest

    from rlhf_pipeline.cli import main

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["prepare-data", "--input", str(beer_posts), "--output", str(tmp_path / "out"), "--finetune-max-pairs", "8"]
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert json.loads(out)["stage"] == "prepare_data"  # nothing before or after the JSON
