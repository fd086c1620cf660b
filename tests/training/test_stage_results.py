"""Every stage returns a StageResult and writes it as `<output>/metrics.json`; what each stage writes reads back
through StageResult.read as the same result, and its consumers (pipeline publish, PPO's reward normalization,
evaluate's policy registration) read it from there. Tiny runs: one or two steps per stage."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sft_reward_helpers import make_data_dir, pair_rows, write_subset

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import StageResult


def posts_xml(path: Path, questions: int = 12) -> Path:
    """A Posts.xml with `questions` questions of three differently scored answers each."""
    rows = []
    for q in range(questions):
        qid = 100 * (q + 1)
        rows.append(f'<row Id="{qid}" PostTypeId="1" Score="3" Title="Beer {q}?" Body="&lt;p&gt;Why {q}?&lt;/p&gt;" />')
        for k, score in enumerate((9, 2, -1)):
            rows.append(
                f'<row Id="{qid + k + 1}" PostTypeId="2" ParentId="{qid}" Score="{score}" '
                f'Body="&lt;p&gt;Answer {k} to {q}.&lt;/p&gt;" />'
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n' + "\n".join(rows) + "\n</posts>\n")
    return path


class Artifact(SimpleNamespace):
    def __init__(self, path):
        super().__init__(path=str(path), metadata={})

    def log_metric(self, name, value):
        self.metadata[name] = value


def published(step: str, out: Path, tmp_path: Path) -> Artifact:
    from rlhf_pipeline.orchestration import steps

    art = Artifact(tmp_path / "kfp" / step)
    steps.publish(step, out, art, None)  # from metrics.json alone, as after a TrainJob
    return art


def test_every_stage_writes_a_stage_result_that_reads_back(tiny_model_dir, tmp_path, mlflow_sqlite):
    from rlhf_pipeline.data.config import PrepareDataConfig
    from rlhf_pipeline.data.prepare import run_prepare_data
    from rlhf_pipeline.evaluation.evaluate import EvaluateConfig, run_evaluate
    from rlhf_pipeline.ppo.config import PPOConfig
    from rlhf_pipeline.ppo.rewards import read_reward_model_dir
    from rlhf_pipeline.ppo.trainer import run_ppo
    from rlhf_pipeline.training.dpo import DPOConfig, run_dpo
    from rlhf_pipeline.training.reward import RewardConfig, run_reward
    from rlhf_pipeline.training.sft import SFTConfig, run_sft

    results: dict[str, StageResult] = {}
    prepared = tmp_path / "prepared"
    results["prepare_data"] = run_prepare_data(
        PrepareDataConfig(
            input=str(posts_xml(tmp_path / "dump" / "beer.stackexchange.com" / "Posts.xml")), output=str(prepared)
        )
    )
    assert results["prepare_data"].status == "prepared" and results["prepare_data"].pairs_total > 0

    data = make_data_dir(tmp_path / "data")
    write_subset(data, "rl", pair_rows())
    common = dict(data=str(data), batch_size=2, lora_r=4, save_steps=100, num_threads=1)
    sft_out, rm_out, ppo_out, dpo_out = (tmp_path / name for name in ("sft", "reward", "ppo", "dpo"))
    results["sft"] = run_sft(
        SFTConfig(
            model=str(tiny_model_dir), output=str(sft_out), max_steps=1, seq_length=32, max_eval_samples=2, **common
        )
    )
    sft_model = str(sft_out / "merged")
    results["reward"] = run_reward(
        RewardConfig(
            model=sft_model,
            output=str(rm_out),
            max_steps=1,
            max_length=64,
            max_eval_samples=4,
            eval_before=False,
            **common,
        )
    )
    results["reward-evaluate"] = run_reward(
        RewardConfig(model=str(rm_out), output=str(tmp_path / "rm-eval"), evaluate_only=True, max_length=64, **common)
    )
    results["ppo"] = run_ppo(
        PPOConfig(
            model=sft_model,
            reward_model=str(rm_out),
            output=str(ppo_out),
            steps=1,
            mini_batch_size=2,
            ppo_epochs=1,
            min_new_tokens=2,
            max_new_tokens=3,
            max_prompt_length=32,
            **common,
        )
    )
    results["dpo"] = run_dpo(
        DPOConfig(model=sft_model, output=str(dpo_out), max_steps=1, max_length=128, max_eval_samples=2, **common)
    )
    results["evaluate"] = run_evaluate(
        EvaluateConfig(
            model=sft_model,
            reward_model=str(rm_out),
            data=str(data),
            output=str(tmp_path / "eval"),
            policy=[f"ppo={ppo_out}", f"dpo={dpo_out}"],
            max_questions=2,
            max_new_tokens=3,
            batch_size=2,
        )
    )

    expected = {
        "prepare_data": ("prepare_data", "prepared", 0),
        "sft": ("sft", "trained", 1),
        "reward": ("reward", "trained", 1),
        "reward-evaluate": ("reward", "evaluated", 0),
        "ppo": ("ppo", "trained", 1),
        "dpo": ("dpo", "trained", 1),
        "evaluate": ("evaluate", "evaluated", 0),
    }
    for key, result in results.items():
        assert StageResult.read(result.output) == result, key  # metrics.json is exactly the returned result
        assert (result.stage, result.status, len(result.registered)) == expected[key], key

    # registered versions: name/version/uri/run_id, versions as text; the policies share one registered model
    assert [(v.name, v.version) for s in ("sft", "reward", "ppo", "dpo") for v in results[s].registered] == [
        ("rlhf-sft", "1"),
        ("rlhf-reward", "1"),
        ("rlhf-policy", "1"),
        ("rlhf-policy", "2"),
    ]
    assert all(
        v.uri == f"models:/{v.name}/{v.version}" and v.run_id
        for s in ("sft", "reward", "ppo", "dpo")
        for v in results[s].registered
    )
    # evaluate tagged both policies through the `registered` of their stage dirs
    assert sorted(results["evaluate"].tagged_versions) == ["models:/rlhf-policy/1", "models:/rlhf-policy/2"]

    # consumers: the pipeline's publish, PPO's reward normalization
    for step, out in (("sft", sft_out), ("reward", rm_out), ("ppo", ppo_out), ("dpo", dpo_out)):
        art = published(step, out, tmp_path)
        registered = StageResult.read(out).registered[-1]
        assert (art.metadata["registered_model"], art.metadata["registered_version"]) == (
            registered.name,
            registered.version,
        ), step
    info = read_reward_model_dir(rm_out)
    assert (info.reward_mean, info.metrics["accuracy"]) == (results["reward"].reward_mean, results["reward"].accuracy)

    # a rerun with the same settings finds each finished training run: reported as "reused", nothing retrained or
    # registered again (other settings would be refused: training/claim.py)
    assert (
        run_sft(
            SFTConfig(
                model=str(tiny_model_dir), output=str(sft_out), max_steps=1, seq_length=32, max_eval_samples=2, **common
            )
        )
        == results["sft"].reused()
    )
    assert (
        run_dpo(
            DPOConfig(model=sft_model, output=str(dpo_out), max_steps=1, max_length=128, max_eval_samples=2, **common)
        ).status
        == "reused"
    )
    assert (
        run_ppo(
            PPOConfig(
                model=sft_model,
                reward_model=str(rm_out),
                output=str(ppo_out),
                steps=1,
                mini_batch_size=2,
                ppo_epochs=1,
                min_new_tokens=2,
                max_new_tokens=3,
                max_prompt_length=32,
                **common,
            )
        )
        == results["ppo"].reused()
    )
    # ... but not the finished run of another stage
    with pytest.raises(UserError, match="holds a finished sft run, not reward"):
        run_reward(RewardConfig(model=sft_model, output=str(sft_out), max_steps=1, **common))
