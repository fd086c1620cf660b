"""DPO / IPO on the tiny model: pair tokenization, one concatenated forward, the reward accuracy and margin rise,
reference == adapter disabled, precomputed reference == in-step reference, resume and registration."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from rlhf_pipeline.batching.tokenize import tokenize_preference_pairs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training.dpo import DPOConfig, collate_dpo_pairs, preference_loss, run_dpo

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rows = []
    for q in range(12):
        rows.append(
            {
                "qid": q,
                "site": "beer",
                "question": f"How long should I age stout number {q}?",
                "response_j": f"About {q + 2} months in a cool cellar, then taste it.",
                "response_k": "Never.",
                "score_j": 4,
                "score_k": 0,
                "answer_id_j": 10 + q,
                "answer_id_k": 50 + q,
            }
        )
    root = tmp_path_factory.mktemp("dpo-data")
    pd.DataFrame(rows).to_parquet(root / "reward.parquet")
    return root


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf_pipeline.modeling.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_pairs_are_tokenized_jointly_and_the_response_mask_covers_the_answer(tokenizer):
    rows = [{"question": "Best hops?", "response_j": "Citra.", "response_k": "Hmm, no idea at all."}]
    pairs, dropped = tokenize_preference_pairs(tokenizer, rows, TEMPLATE, 64)
    ids_j, start_j, ids_k, start_k = pairs[0]
    assert dropped == 0
    assert ids_j == tokenizer("Question: Best hops?\n\nAnswer: Citra.")["input_ids"] + [tokenizer.eos_token_id]
    assert (
        tokenizer.decode(ids_j[start_j:]) == " Citra.<|im_end|>"
        or tokenizer.decode(ids_j[start_j:]) == "Citra.<|im_end|>"
    )
    assert tokenizer.decode(ids_j[:start_j]).startswith("Question: Best hops?")
    batch = collate_dpo_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # [chosen, rejected]
    assert batch["label_mask"][0].sum() == len(ids_j) - start_j
    assert batch["label_mask"][1].sum() == len(ids_k) - start_k
    assert tokenize_preference_pairs(tokenizer, rows, TEMPLATE, 8)[1] == 1  # too long -> dropped, counted


def test_reference_is_the_sft_model_and_the_loss_starts_at_log2(tiny_model_dir, tokenizer):
    from rlhf_pipeline.modeling.loading import load_causal_lm
    from rlhf_pipeline.modeling.lora import apply_lora
    from rlhf_pipeline.training.dpo import response_logps

    cfg = DPOConfig(model=str(tiny_model_dir), data="x", output="x", lora_r=4, lora_dropout=0.0)
    rows = [{"question": f"Q{i}?", "response_j": "Yes, indeed." * (i + 1), "response_k": "No."} for i in range(3)]
    pairs, _ = tokenize_preference_pairs(tokenizer, rows, TEMPLATE, 128)
    batch = collate_dpo_pairs(pairs, tokenizer.pad_token_id)
    policy = apply_lora(load_causal_lm(str(tiny_model_dir), device="cpu"), cfg).eval()
    loss, metrics = preference_loss(policy, batch, cfg)  # fresh LoRA (B = 0): policy == reference
    assert float(loss) == pytest.approx(0.693147, abs=1e-5) and metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    sft = load_causal_lm(str(tiny_model_dir), device="cpu").eval()
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
        with policy.disable_adapter():
            ref = response_logps(policy, batch, average=False)
        assert torch.allclose(ref, response_logps(sft, batch, average=False), atol=1e-4)
        assert not torch.allclose(ref, response_logps(policy, batch, average=False), atol=1e-3)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_reward_accuracy_and_margin_rise(tiny_model_dir, data_dir, tmp_path, mlflow_sqlite, loss):
    import mlflow

    cfg = DPOConfig(
        model=str(tiny_model_dir),
        data=str(data_dir),
        output=str(tmp_path / "dpo"),
        loss=loss,
        beta=0.1 if loss == "dpo" else 0.5,
        max_steps=8,
        batch_size=4,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        lora_r=8,
        eval_fraction=0.2,
        max_length=128,
        save_steps=100,
        register_model=(loss == "dpo"),
    )
    summary = run_dpo(cfg)
    assert (summary.stage, summary.status) == ("dpo", "trained")
    assert summary.first_margin == pytest.approx(0.0, abs=1e-6)  # step 1 starts at policy == reference
    assert summary.metrics["dpo/reward_accuracy"] == 1.0 and summary.metrics["dpo/margin"] > 0.1
    assert summary.metrics["dpo/pairs_per_s"] > 0
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert metrics["loss_type"] == loss and (tmp_path / "dpo" / "merged" / "config.json").is_file()
    assert StageResult.read(tmp_path / "dpo") == summary
    if loss == "dpo":
        client = mlflow.tracking.MlflowClient()
        [registered] = summary.registered
        version = client.get_model_version("rlhf-policy", registered.version)
        assert version.tags["algorithm"] == "dpo" and registered.uri == f"models:/rlhf-policy/{version.version}"
        run = client.get_run(registered.run_id)
        for key in (
            "dpo/loss",
            "dpo/reward_accuracy",
            "dpo/margin",
            "dpo/chosen_reward",
            "dpo/rejected_reward",
            "dpo/pairs_per_s",
        ):
            assert key in run.data.metrics, key
    else:
        assert summary.registered == []
    again = run_dpo(cfg)  # a finished run is reported, not redone
    assert again.status == "reused" and again.registered == summary.registered and again.steps == summary.steps


def test_precomputed_reference_gives_the_same_training(tiny_model_dir, data_dir, tmp_path, mlflow_sqlite):
    common = dict(
        model=str(tiny_model_dir),
        data=str(data_dir),
        max_steps=3,
        batch_size=4,
        learning_rate=2e-3,
        lora_r=4,
        eval_fraction=0.0,
        max_length=128,
        register_model=False,
        save_steps=100,
    )
    in_step = run_dpo(DPOConfig(output=str(tmp_path / "a"), **common))
    once = run_dpo(DPOConfig(output=str(tmp_path / "b"), precompute_ref=True, **common))
    assert once.metrics["dpo/loss"] == pytest.approx(in_step.metrics["dpo/loss"], abs=1e-4)
    assert once.metrics["dpo/margin"] == pytest.approx(in_step.metrics["dpo/margin"], abs=1e-4)


def test_resume_continues_to_the_same_step_count(tiny_model_dir, data_dir, tmp_path, mlflow_sqlite):
    from rlhf_pipeline.training.checkpoint import latest_checkpoint

    out = tmp_path / "dpo"
    common = dict(
        model=str(tiny_model_dir),
        data=str(data_dir),
        output=str(out),
        batch_size=4,
        learning_rate=2e-3,
        lora_r=4,
        eval_fraction=0.0,
        max_length=128,
        register_model=False,
        save_steps=2,
    )

    def crash(step):
        if step == 2:
            raise KeyboardInterrupt("simulated preemption")

    with pytest.raises(KeyboardInterrupt):
        run_dpo(DPOConfig(max_steps=4, **common), on_step=crash)
    assert latest_checkpoint(out).name == "step-2" and not (out / "metrics.json").exists()
    # another step count is another run: refused naming the field, not continued under another schedule
    with pytest.raises(UserError, match=r"max_steps \(4 -> 6\)"):
        run_dpo(DPOConfig(max_steps=6, **common))
    summary = run_dpo(DPOConfig(max_steps=4, **common))
    assert summary.status == "trained" and summary.steps == 4 and summary.trained_steps == 2
    assert latest_checkpoint(out).name == "step-4"
