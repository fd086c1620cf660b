"""Reward model on a tiny random-init Llama with the SmolLM2 tokenizer (pad == eos): pooling at the last real
token, the pairwise loss against hand-computed values, training, registry, --evaluate-only, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sft_reward_helpers import make_data_dir, pair_rows, write_subset

from rlhf_pipeline.batching.padding import collate_pairs, split_chosen_rejected
from rlhf_pipeline.modeling.forward import last_token_index, sequence_rewards
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training.reward import RewardConfig, run_reward
from rlhf_pipeline.training.reward_scoring import pairwise_accuracy, pairwise_loss

EOS = 2  # SmolLM2: eos == pad == <|im_end|>


@pytest.fixture(scope="module")
def tiny_scorer(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = EOS
    return model


def pad(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), EOS)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


# sequences end with a REAL eos, which is also the pad token
SEQS = [[11, 12, 13, 14, 15, 16, EOS], [21, 22, EOS], [31, 32, 33, 34, EOS]]


def test_last_token_index_any_padding_side():
    _, right = pad(SEQS, "right")
    _, left = pad(SEQS, "left")
    assert last_token_index(right).tolist() == [6, 2, 4]
    assert last_token_index(left).tolist() == [6, 6, 6]


def test_scores_identical_for_right_and_left_padding_with_pad_equal_eos(tiny_scorer):
    with torch.no_grad():
        alone = torch.cat(
            [sequence_rewards(tiny_scorer, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in SEQS]
        )
        right = sequence_rewards(tiny_scorer, *pad(SEQS, "right"))
        left = sequence_rewards(tiny_scorer, *pad(SEQS, "left"))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)


def test_naive_pad_based_pooling_reads_the_wrong_token(tiny_scorer):
    """Pooling by pad token id (first pad - 1, or transformers' last non-pad) misreads pad == eos sequences."""
    ids, mask = pad(SEQS, "right")
    first_pad_minus_one = (ids == EOS).int().argmax(dim=1) - 1
    assert first_pad_minus_one.tolist() == [5, 1, 3]  # the token BEFORE the real eos, not the eos (6, 2, 4)
    left_ids, _ = pad(SEQS, "left")
    assert ((left_ids == EOS).int().argmax(dim=1) - 1).tolist() == [5, -1, -1]  # -1: wraps to the wrong end
    with torch.no_grad():
        ours = sequence_rewards(tiny_scorer, ids, mask)
        builtin = tiny_scorer(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        hidden = tiny_scorer.model(input_ids=ids, attention_mask=mask).last_hidden_state
        one_early = tiny_scorer.score(hidden[torch.arange(3), first_pad_minus_one]).squeeze(-1)
    torch.testing.assert_close(builtin, one_early)  # transformers' pooling = one token early here
    assert (builtin - ours).abs().min() > 1e-4  # ... so every score differs from the last-real-token score


def test_pairwise_loss_and_accuracy_match_hand_computed_values():
    chosen = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rejected = torch.tensor([1.0, 0.0, 0.5, -1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 0, 4
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2) + math.log1p(math.exp(-4))) / 4
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(chosen, rejected) == 0.5  # the tie (0.5 vs 0.5) counts as wrong


def test_batched_pair_forward_equals_scoring_each_side_alone(tiny_scorer):
    pairs = [(SEQS[0], SEQS[1]), (SEQS[2], [41, 42, 43, 44, 45, 46, 47, 48, EOS])]
    with torch.no_grad():
        chosen, rejected = split_chosen_rejected(sequence_rewards(tiny_scorer, **collate_pairs(pairs, EOS)))
        by_hand = [
            [
                float(sequence_rewards(tiny_scorer, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)))
                for s in pair
            ]
            for pair in pairs
        ]
    torch.testing.assert_close(chosen, torch.tensor([p[0] for p in by_hand]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rejected, torch.tensor([p[1] for p in by_hand]), atol=1e-5, rtol=1e-4)
    loss_by_hand = sum(math.log1p(math.exp(-(j - k))) for j, k in by_hand) / 2
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(loss_by_hand, rel=1e-4)


def reward_config(tiny_model_dir, tmp_path, **overrides) -> RewardConfig:
    values = dict(
        model=str(tiny_model_dir),
        data=str(make_data_dir(tmp_path / "data")),
        output=str(tmp_path / "out"),
        max_length=64,
        batch_size=4,
        max_steps=30,
        save_steps=100,
        learning_rate=3e-3,
        eval_fraction=0.25,
        lora_dropout=0.0,
        num_threads=1,
    )
    values.update(overrides)
    return RewardConfig(**values)


def test_reward_trains_registers_and_evaluates(tiny_model_dir, tmp_path, mlflow_sqlite):
    cfg = reward_config(tiny_model_dir, tmp_path)
    result = run_reward(cfg)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (result.stage, result.status, metrics["status"]) == ("reward", "trained", "trained")
    assert StageResult.read(out) == result
    assert metrics["num_pairs"] == 4 and metrics["train_pairs"] == 12 and metrics["dropped_too_long"] == 0
    assert metrics["accuracy"] == 1.0 and metrics["margin"] > 0  # good answers vs "no idea": easy
    for key in ("reward_mean", "reward_std", "eval_loss", "pairs_per_s", "accuracy_before", "train_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["reward_std"] > 0

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification

    client = MlflowClient()
    version = client.get_model_version("rlhf-reward", "1")
    assert version.tags["rm/accuracy"] == "1.0000" and version.tags["stage"] == "reward"
    [registered] = result.registered
    assert (registered.name, registered.version, registered.uri) == ("rlhf-reward", "1", "models:/rlhf-reward/1")
    run_id = registered.run_id
    for name in ("rm/loss", "rm/accuracy", "rm/margin", "rm/reward_mean", "rm/reward_std", "rm/pairs_per_s"):
        assert client.get_metric_history(run_id, name), name
    assert "reward/curves.png" in [a.path for a in client.list_artifacts(run_id, "reward")]  # the training curves

    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == EOS
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # --evaluate-only on the registered version reproduces the held-out numbers (same split of reward.parquet)
    evaluated = run_reward(
        cfg.model_copy(
            update={
                "evaluate_only": True,
                "model": "models:/rlhf-reward/1",
                "output": str(tmp_path / "eval"),
                "eval_subset": "reward",
            }
        )
    )
    assert (evaluated.stage, evaluated.status, evaluated.registered) == ("reward", "evaluated", [])
    assert evaluated.num_pairs == 4 and evaluated.accuracy == metrics["accuracy"]
    assert evaluated.margin == pytest.approx(metrics["margin"], rel=1e-3, abs=1e-4)
    assert StageResult.read(tmp_path / "eval") == evaluated
    # ... and on a directory (the stage output), defaulting to evaluation.parquet
    on_dir = run_reward(
        cfg.model_copy(update={"evaluate_only": True, "model": str(out), "output": str(tmp_path / "eval-dir")})
    )
    assert on_dir.subset == "evaluation" and on_dir.num_pairs == 16

    # a rerun reports the finished training run instead of retraining
    again = run_reward(cfg)
    assert again.status == "reused" and again.registered == result.registered and again.accuracy == result.accuracy


def test_too_long_pairs_are_dropped_and_counted(tiny_model_dir, tmp_path, mlflow_sqlite):
    rows = pair_rows()
    rows[0] = {**rows[0], "response_k": "hops " * 200}  # one pair far over max_length
    data = make_data_dir(tmp_path / "data-long")
    write_subset(data, "reward", rows)
    result = run_reward(reward_config(tiny_model_dir, tmp_path, data=str(data), max_steps=1, register_model=False))
    assert result.dropped_too_long == 1 and result.registered == []
    assert result.train_pairs + result.num_pairs == len(rows) - 1


def test_reward_resume_restores_score_head(tiny_model_dir, tmp_path, mlflow_sqlite):
    full = reward_config(
        tiny_model_dir, tmp_path, output=str(tmp_path / "full"), max_steps=4, save_steps=2, register_model=False
    )
    run_reward(full)
    cut = full.model_copy(update={"output": str(tmp_path / "cut")})

    def crash(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_reward(cut, on_step=crash)
    resumed = run_reward(cut)
    assert resumed.status == "trained" and resumed.steps == 4 and resumed.trained_steps == 2
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert any("score" in k for k in a)  # the head is saved with the adapter
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_reward_through_a_real_mlflow_server(tiny_model_dir, tmp_path, mlflow_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    result = run_reward(
        reward_config(
            tiny_model_dir, tmp_path, max_steps=2, tracking_uri=mlflow_server, registered_model_prefix="server-test"
        )
    )
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_server)
    version = MlflowClient().get_model_version("server-test-reward", result.registered[0].version)
    assert float(version.tags["rm/accuracy"]) == pytest.approx(result.accuracy, abs=1e-4)
    evaluated = run_reward(
        RewardConfig(
            model=f"models:/server-test-reward/{version.version}",
            data=str(tmp_path / "data"),
            output=str(tmp_path / "ev"),
            evaluate_only=True,
            tracking_uri=mlflow_server,
            max_length=64,
        )
    )
    assert evaluated.num_pairs == 16 and StageResult.read(tmp_path / "ev") == evaluated


@pytest.mark.parametrize("recipe", ["recipes/smollm2/reward.yaml", "recipes/llama-7b/reward.yaml"])
def test_reward_recipes_are_valid(recipe):
    cfg = RewardConfig.load(Path(__file__).resolve().parents[2] / recipe)
    assert cfg.lora_r == 8 and cfg.lora_dropout == 0.1 and cfg.model.endswith("merged")


def test_reward_trains_with_the_cpu_recipe_kernels(tiny_model_dir, tmp_path, mlflow_sqlite, monkeypatch):
    """bf16 base + autocast + --fused-kernels (the smollm2 recipe's settings): the row-split matmuls really run
    (forced onto these tiny batches) and the model still learns the easy pairs."""
    from rlhf_pipeline.cpu import fused_ops
    from rlhf_pipeline.cpu import row_split_matmul as rsm

    if not fused_ops.compiler_available() or rsm.extension() is None:
        pytest.skip("no C++ compiler for the fused kernels here")
    monkeypatch.setattr(fused_ops, "_enabled", False)  # restored afterwards: other tests stay eager
    monkeypatch.setattr(rsm, "MIN_ROWS_PER_THREAD", 1)
    splits = []
    extension = rsm.extension()
    monkeypatch.setattr(
        rsm,
        "extension",
        lambda: type(
            "Spy",
            (),
            {"row_split_mm": lambda a, b, chunks: splits.append(chunks) or extension.row_split_mm(a, b, chunks)},
        ),
    )
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)  # the process-wide state other tests made has mixed_precision="no"
    try:
        metrics = run_reward(
            reward_config(
                tiny_model_dir,
                tmp_path,
                precision="bf16",
                mixed_precision="bf16",
                cpu_kernels="fused",
                lora_dropout=0.1,
                num_threads=2,
            )
        )
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
    assert splits and set(splits) == {2}  # forward and input-gradient matmuls, two row blocks each
    assert metrics.accuracy == 1.0 and metrics.margin > 0
    assert math.isfinite(metrics.train_loss) and metrics.trained_steps == 30
