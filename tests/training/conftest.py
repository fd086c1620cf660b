"""Fixtures the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhf_pipeline.results import StageResult

EOS = 2  # <|im_end|> in the SmolLM2 tokenizer: both eos and pad


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward-stage-shaped output on the tiny base: adapter/ (random LoRA SEQ_CLS + score), merged/, metrics.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "reward"
    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = EOS
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "merged")
    StageResult.of("reward", "trained", out, {"accuracy": 0.7, "reward_mean": 0.5, "reward_std": 2.0}).write()
    return out
