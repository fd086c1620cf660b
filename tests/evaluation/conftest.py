"""Fixtures for the evaluation tests: an evaluation subset, a reward-stage-shaped output, a changed policy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from rlhf_pipeline.results import StageResult


@pytest.fixture(scope="module")
def eval_data_dir(tmp_path_factory) -> Path:
    rows = [
        {
            "qid": q,
            "site": "beer",
            "question": f"What glass suits a Belgian tripel number {q}?",
            "response_j": "A tulip glass.",
            "response_k": "Any.",
            "score_j": 3,
            "score_k": 0,
            "answer_id_j": 100 + q,
            "answer_id_k": 200 + q,
        }
        for q in range(6)
    ]
    root = tmp_path_factory.mktemp("eval-data")
    pd.DataFrame(rows).to_parquet(root / "evaluation.parquet")
    return root


def _reward_stage_dir(tiny_model_dir, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = 2
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "merged")
    StageResult.of("reward", "trained", out, {"accuracy": 0.75, "reward_mean": 0.0, "reward_std": 1.0}).write()
    return out


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _reward_stage_dir(tiny_model_dir, tmp_path_factory.mktemp("rm") / "reward", seed=5)


@pytest.fixture(scope="module")
def judge_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Another random reward model: scores differ from the proxy's."""
    return _reward_stage_dir(tiny_model_dir, tmp_path_factory.mktemp("judge") / "judge", seed=11)


@pytest.fixture(scope="module")
def changed_policy_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 'stage output' whose merged/ model differs from the tiny SFT model (random LoRA merged in)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("policy") / "ppo"
    torch.manual_seed(6)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "merged")
    return out


@pytest.fixture(scope="module")
def ppo_stage_with_checkpoints(tiny_model_dir, tmp_path_factory):
    """A PPO-shaped stage dir: adapter/ and merged/ (the final policy), checkpoints step-5 and step-10 (the final
    one) whose trainable.safetensors hold `policy.`-prefixed LoRA weights and a value head. Returns (dir, the
    peft model, the LoRA weights at step 5)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = tmp_path_factory.mktemp("ppo-ckpt") / "ppo"
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    at_step = {}
    for step in (5, 10):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        at_step[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        state = {f"policy.{n}": v for n, v in at_step[step].items()}
        state["value_head.summary.weight"] = torch.zeros(1, 8)
        (stage / "checkpoints" / f"step-{step}").mkdir(parents=True)
        save_file(state, str(stage / "checkpoints" / f"step-{step}" / "trainable.safetensors"))
    model.save_pretrained(stage / "adapter")  # the final policy = step 10
    merged = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        params = dict(merged.named_parameters())
        for n, v in at_step[10].items():
            params[n].copy_(v)
    merged.merge_and_unload().save_pretrained(stage / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(stage / "merged")
    return stage, model, at_step[5]
