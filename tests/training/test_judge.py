"""`rlhf reward --subset judge`: the independent judge trains on judge.parquet alone and registers as
<prefix>-judge, leaving <prefix>-reward (the proxy PPO optimizes) untouched."""

from __future__ import annotations

from sft_reward_helpers import pair_rows, write_subset

from rlhf_pipeline.training.reward import RewardConfig, run_reward


def test_judge_trains_on_its_own_subset_and_registers_as_judge(tiny_model_dir, tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    data = tmp_path / "data"
    write_subset(data, "judge", pair_rows(8, 2))  # no reward.parquet: training cannot read the proxy's pairs
    cfg = RewardConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output=str(tmp_path / "judge"),
        subset="judge",
        max_length=64,
        batch_size=4,
        max_steps=30,
        save_steps=100,
        learning_rate=3e-3,
        eval_fraction=0.25,
        lora_dropout=0.0,
        eval_before=False,
        num_threads=1,
    )
    result = run_reward(cfg)
    [registered] = result.registered
    assert (registered.name, registered.uri) == ("rlhf-judge", "models:/rlhf-judge/1")
    assert result.metrics["train_questions"] == 6 and result.metrics["eval_questions"] == 2
    assert result.metrics["accuracy"] == 1.0  # good answers vs "no idea" on held-out judge questions
    assert [m.name for m in MlflowClient().search_registered_models()] == ["rlhf-judge"]


def test_judge_and_proxy_start_from_different_heads_with_the_same_seed(tiny_model_dir, tmp_path):
    """Same base, same --seed, one optimizer step each: the judge's score head is not the proxy's (initialized
    alike, the two would agree by construction and the judge would not be independent)."""
    import torch
    from safetensors.torch import load_file

    data = tmp_path / "data"
    write_subset(data, "judge", pair_rows(8, 2))
    write_subset(data, "reward", pair_rows(8, 2))
    heads = {}
    for subset in ("reward", "judge"):
        cfg = RewardConfig(
            model=str(tiny_model_dir),
            data=str(data),
            output=str(tmp_path / subset),
            subset=subset,
            max_length=64,
            batch_size=4,
            max_steps=1,
            learning_rate=1e-6,
            eval_fraction=0.25,
            eval_before=False,
            register_model=False,
            num_threads=1,
        )
        result = run_reward(cfg)
        weights = load_file(next((tmp_path / subset / "merged").glob("*.safetensors")))
        heads[subset] = next(w for name, w in weights.items() if "score" in name).float().flatten()
        assert result.metrics["trained_steps"] == 1
    cosine = torch.nn.functional.cosine_similarity(heads["reward"], heads["judge"], dim=0)
    assert abs(float(cosine)) < 0.5, float(cosine)  # two independent random directions: about 0
