"""The validate-config step through kfp.local (SubprocessRunner: each step its own process, the component code a
cluster runs): a bad key fails the run there, with one line, before any other step starts; good parameters come
out merged (the typed parameter over its blob) for the steps."""

from __future__ import annotations

import re
import warnings

import pytest


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    from kfp import local

    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def started_tasks(output: str) -> set[str]:
    """The tasks kfp.local started (it logs `Executing task '<name>'` for each, in color)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    return set(re.findall(r"Executing task '([\w-]+)'", plain))


def test_a_bad_key_fails_in_the_validation_step_and_no_training_step_starts(kfp_local, tmp_path, capfd):
    from pipelines.rlhf_pipeline import build_pipeline

    pipeline = build_pipeline(None)
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")
        pipeline(
            input_data=str(tmp_path / "Posts.xml"),  # never read: the run stops before prepare-data
            sft_config={"max_seq_length": 1024},  # the example the old parameter docs gave: not an SFT option
            work_root=str(tmp_path / "work"),
            mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert started_tasks(output) == {"validate-config"}
    assert not (tmp_path / "work").exists() and not (tmp_path / "mlflow.db").exists()
    lines = [line for line in output.splitlines() if "invalid pipeline parameters" in line]
    assert lines and all(
        line.endswith(
            "invalid pipeline parameters: sft_config: unknown option max_seq_length "
            "(see `rlhf sft --help`, underscores for dashes)"
        )
        for line in lines
    ), lines


def test_the_step_outputs_the_merged_options_and_the_tracking_uri(kfp_local):
    from components.validate_config import validate_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = validate_config(
            alignment="both",
            prepare_data_config={"seed": 3},
            sft_config={"max_steps": 500, "lora_r": 16},
            reward_config={},
            judge_config={},
            ppo_config={"steps": 5},
            dpo_config={"max_steps": 9},
            evaluate_config={},
            sft_max_steps=7,  # wins over sft_config's 500
            sft_seq_length=256,
            reward_max_steps=0,
            judge_max_steps=0,
            ppo_steps=3,  # wins over ppo_config's 5
            ppo_batch_size=8,
            dpo_max_steps=0,  # unset: dpo_config's 9 stays
            evaluate_max_questions=4,
            mlflow_tracking_uri="$MLFLOW_TRACKING_URI",
        )
    out = task.outputs
    assert out["sft_config"] == {"max_steps": 7, "lora_r": 16, "seq_length": 256}
    assert out["ppo_config"] == {"steps": 3, "batch_size": 8}
    assert out["dpo_config"] == {"max_steps": 9}
    assert out["reward_config"] == {} and out["prepare_data_config"] == {"seed": 3}
    assert out["evaluate_config"] == {"max_questions": 4}
    assert out["tracking_uri"] == ""  # the default: the steps read $MLFLOW_TRACKING_URI themselves
