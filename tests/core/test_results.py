"""StageResult, the one result type: envelope + the stage's own metrics, written and read as metrics.json."""

from __future__ import annotations

import json

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import RegisteredVersion, StageResult
from rlhf_pipeline.training import loop

ENTRY = {"name": "rlhf-sft", "version": 3, "uri": "models:/rlhf-sft/3", "run_id": "abc"}  # tracking's register()


def test_envelope_and_metrics_round_trip(tmp_path):
    result = StageResult.of(
        "sft",
        "trained",
        tmp_path,
        {"eval_loss": 1.5, "sft/x": 2, "nested": {"a": [1]}, "eval_perplexity": None},
        processes=2,
        registered=RegisteredVersion.from_entries(ENTRY, None),
    )
    assert result.write() == tmp_path / "metrics.json"
    assert StageResult.read(tmp_path) == result
    assert result.metrics == {"eval_loss": 1.5, "sft/x": 2, "nested": {"a": [1]}, "eval_perplexity": None}
    assert result.eval_loss == 1.5 and result.processes == 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["registered"] == [{**ENTRY, "version": "3"}]  # versions are text, as MLflow's API takes them
    assert saved["eval_loss"] == 1.5 and saved["status"] == "trained"  # metrics stay top-level (MLflow, bench)
    assert not list(tmp_path.glob("*.tmp"))


def test_reused_keeps_everything_but_the_status(tmp_path):
    result = StageResult.of("dpo", "trained", tmp_path, {"steps": 4})
    assert result.reused().status == "reused" and result.reused().model_dump(exclude={"status"}) == result.model_dump(
        exclude={"status"}
    )


def test_metric_names_may_not_shadow_the_envelope(tmp_path):
    for name in ("status", "registered", "processes", "metrics"):
        with pytest.raises(ValueError, match=name):
            StageResult.of("sft", "trained", tmp_path, {name: 1})


def test_unknown_status_and_unknown_registry_fields_are_refused(tmp_path):
    with pytest.raises(ValueError):
        StageResult.of("sft", "done", tmp_path, {})
    with pytest.raises(ValueError):
        RegisteredVersion.from_entries({**ENTRY, "aliases": []})


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("{not json", "is not a stage result"),
        (json.dumps({"accuracy": 0.7, "registered_model": {"version": 1}}), "is not a stage result"),
    ],
)
def test_unreadable_results_are_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(UserError, match=message) as err:
        StageResult.read(tmp_path)
    assert "\n" not in str(err.value)


def test_finished_run_needs_the_model_and_the_same_stage(tmp_path):
    assert loop.finished_run(tmp_path) is None
    loop.write_metrics(tmp_path, StageResult.of("sft", "trained", tmp_path, {"steps": 2}))
    assert loop.finished_run(tmp_path) is None  # no merged model: not finished
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    done = loop.finished_run(tmp_path, "sft")
    assert (done.stage, done.status, done.steps) == ("sft", "reused", 2)
    with pytest.raises(UserError, match="holds a finished sft run, not dpo"):
        loop.finished_run(tmp_path, "dpo")
