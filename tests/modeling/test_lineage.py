"""The base-sharing decision from recorded lineage: the content hash a stage writes of the base it trained on,
against the policy base's; both ways, and on a (stubbed) 4-bit base, where comparing tensors cannot decide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rlhf_pipeline.modeling.lineage import hash_safetensors, record_lineage, trained_on, weights_sha256
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.policy import PolicyWithValue
from rlhf_pipeline.ppo.rewards import RewardModelScorer, SharedBaseRewardModel, read_reward_model_dir, same_backbone
from rlhf_pipeline.results import StageResult

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


def reward_stage_output(base_dir: Path, out: Path) -> Path:
    """What the reward stage leaves (adapter/, merged/, metrics.json), trained on `base_dir`, lineage recorded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    base.config.pad_token_id = 2
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / "merged")
    record_lineage(out / "adapter", out / "merged")
    StageResult.of("reward", "trained", out, {"reward_mean": 0.0, "reward_std": 1.0}).write()
    return out


def changed_copy(model_dir: Path, out: Path) -> Path:
    """The same model with one weight nudged: another base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 0.5
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_record_lineage_writes_the_base_and_merged_hashes(tiny_model_dir, tmp_path):
    out = reward_stage_output(tiny_model_dir, tmp_path / "rm")
    adapter = json.loads((out / "adapter" / "lineage.json").read_text())
    merged = json.loads((out / "merged" / "lineage.json").read_text())
    assert adapter["base_weights_sha256"] == hash_safetensors(tiny_model_dir)
    assert merged["weights_sha256"] == hash_safetensors(out / "merged") != adapter["base_weights_sha256"]
    # a copy elsewhere has the same content hash; the recorded hash is what weights_sha256 reads
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert hash_safetensors(copy) == hash_safetensors(tiny_model_dir)
    (copy / "lineage.json").write_text(json.dumps({"weights_sha256": "recorded"}))
    assert weights_sha256(copy) == "recorded"


def test_trained_on_both_ways_and_without_a_record(tiny_model_dir, tmp_path):
    out = reward_stage_output(tiny_model_dir, tmp_path / "rm")
    other = changed_copy(tiny_model_dir, tmp_path / "other")
    assert trained_on(out / "adapter", tiny_model_dir) is True
    assert trained_on(out / "adapter", other) is False
    (out / "adapter" / "lineage.json").unlink()
    assert trained_on(out / "adapter", tiny_model_dir) is None


def policy_on(model_dir: Path, *, quantize=None) -> PolicyWithValue:
    from rlhf_pipeline.modeling.loading import load_causal_lm

    cfg = PPOConfig(model=str(model_dir), data="x", output="x", lora_r=4)
    base = load_causal_lm(str(model_dir), device="cpu")
    if quantize is not None:
        base = quantize(base)
    return PolicyWithValue.build(base, cfg).eval()


def test_a_4bit_policy_base_shares_the_reward_adapter_by_lineage(tiny_model_dir, tmp_path, quantize_4bit):
    """Tensors of a 4-bit base cannot be compared (same_backbone says no), the recorded hash decides yes: the
    reward adapter runs on the policy's own (stubbed 4-bit) base and scores like the separate reward model."""
    out = reward_stage_output(tiny_model_dir, tmp_path / "rm")
    model = policy_on(tiny_model_dir, quantize=quantize_4bit)
    assert not same_backbone(model.policy.get_base_model(), read_reward_model_dir(out))
    cfg = PPOConfig(model=str(tiny_model_dir), data="x", output="x", reward_model=str(out))
    shared = model.attach_reward_model(cfg)
    assert isinstance(shared, SharedBaseRewardModel)
    separate = RewardModelScorer.load(out, template=TEMPLATE, device="cpu")
    questions, responses = ["Best hops?", "Is lager a beer?"], ["Citra.", "Yes, a bottom-fermented one."]
    torch.testing.assert_close(
        shared.raw_scores(questions, responses), separate.raw_scores(questions, responses), atol=1e-4, rtol=1e-4
    )


def test_a_recorded_other_base_is_not_shared_even_when_tensors_would_match(tiny_model_dir, tmp_path):
    """The record says the reward model was trained on another base: loaded separately, although the probed
    tensors of this base match (the decision is the lineage's, not the probe's)."""
    out = reward_stage_output(tiny_model_dir, tmp_path / "rm")
    record = out / "adapter" / "lineage.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "base_weights_sha256": "0" * 64}))
    model = policy_on(tiny_model_dir)
    assert same_backbone(model.policy.get_base_model(), read_reward_model_dir(out))
    cfg = PPOConfig(model=str(tiny_model_dir), data="x", output="x", reward_model=str(out))
    scorer = model.attach_reward_model(cfg)
    assert not isinstance(scorer, SharedBaseRewardModel) and isinstance(scorer, RewardModelScorer)


def test_finish_stage_records_lineage(tiny_model_dir, tmp_path):
    """training/outputs.finish_stage writes the records after the stage's save (here a save that returns the
    directories of a reward output whose records were removed)."""
    from types import SimpleNamespace

    from rlhf_pipeline.training.outputs import finish_stage

    out = reward_stage_output(tiny_model_dir, tmp_path / "rm")
    (out / "adapter" / "lineage.json").unlink()
    (out / "merged" / "lineage.json").unlink()
    assert trained_on(out / "adapter", tiny_model_dir) is None
    run = SimpleNamespace(register_enabled=False, register=lambda *a, **k: None, log_dict=lambda *a, **k: None)
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    finish_stage(accelerator, run, "reward", str(out), {}, lambda: (out / "adapter", out / "merged"))
    assert trained_on(out / "adapter", tiny_model_dir) is True
    assert weights_sha256(out / "merged") == hash_safetensors(out / "merged")
