"""The memory estimator's formula against hand-computed values (a toy architecture with small round sizes), the
7B figures the issue quotes, and `rlhf estimate-memory` on the llama-7b recipes (each stage within 20 GiB)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_pipeline.modeling import forward
from rlhf_pipeline.modeling import memory_estimate as me

REPO = Path(__file__).parents[2]
# V=100, H=8, I=16, 2 layers, 2 heads of 4 (q width 8), 1 KV head (kv width 4), untied LM head
TOY = me.Architecture(100, 8, 16, 2, 2, 1, 4, False)


def test_parameter_counts_by_hand():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate 8x16 + up 8x16 + down 16x8 = 64+32+32+64+128+128+128 = 576
    assert TOY.linear_params() == 2 * 576
    # embeddings + LM head 2 x 100 x 8, norms (2 per layer + final) x 8
    assert TOY.other_params() == 1600 + 5 * 8
    # LoRA r=2 on q (8 -> 8) and v (8 -> 4): 2 x (2*16 + 2*12) per layer
    assert TOY.lora_params(2, ["q_proj", "v_proj"]) == 2 * (32 + 24)
    # attention 2H + q + 2kv + q + H = 16+8+8+8+8 = 48; MLP 2H + 4I + H = 16+64+8 = 88
    assert TOY.activation_elements_per_token_layer() == 136
    with pytest.raises(ValueError, match="not decoder linears"):
        TOY.lora_params(2, ["c_attn"])


def test_weight_bytes_by_quantization():
    nf4 = 0.5 + 1 / 64 + 4 / 16384  # 4 bits + an 8-bit absmax per 64 + an fp32 absmax per 256 x 64
    assert me.weight_bytes(TOY, "4bit", "bf16") == pytest.approx(1152 * nf4 + 1640 * 2)
    assert me.weight_bytes(TOY, "8bit", "bf16") == pytest.approx(1152 * 1 + 1640 * 2)
    assert me.weight_bytes(TOY, "none", "fp32") == pytest.approx((1152 + 1640) * 4)


def test_sft_phase_by_hand():
    w = me.Workload(stage="sft", quantization="4bit", lora_r=2, gradient_checkpointing=True, batch_size=2, seq_length=4)
    (train,) = me.estimate(TOY, w)
    n = 2 * 4
    assert train.parts["trainable"] == 112 * 16  # fp32 weight + grad + two AdamW moments
    # every layer's input (H, bf16) + one layer's 136 elements recomputed, with its gradients (x 2)
    assert train.parts["activations"] == 2 * n * 8 * 2 + 2 * (n * 136 * 2)
    # all n rows in one chunk: bf16 head output + fp32 copy + fp32 exp + fp32 grad + bf16 grad = 16 B / element
    assert train.parts["logits"] == n * 100 * 16
    assert train.total == pytest.approx(me.weight_bytes(TOY, "4bit", "bf16") + 1792 + 4608 + 12800)
    plain = me.estimate(TOY, me.Workload(stage="sft", lora_r=2, batch_size=2, seq_length=4))[0]
    assert plain.parts["activations"] == 3 * n * 136 * 2  # 2 layers kept + the gradients of one


def test_ppo_phases_by_hand():
    w = me.Workload(
        stage="ppo", quantization="4bit", lora_r=2, gradient_checkpointing=True, batch_size=4, prompt_length=3,
        new_tokens=2, mini_batch_size=4, rollout_batch_size=2, reward_lora_r=8,
    )  # fmt: skip
    phases = {p.name: p for p in me.estimate(TOY, w)}
    assert list(phases) == ["generate", "score", "reference", "old", "update"]
    generate = phases["generate"]
    assert generate.parts["kv_cache"] == 2 * 2 * 2 * 5 * 4 * 2  # K+V x layers x 2 rows x 5 tokens x kv 4 x bf16
    assert generate.parts["activations"] == 6 * 8 * 2 + 6 * 136 * 2  # prefill of 2 x 3 tokens
    assert generate.parts["logits"] == 2 * 100 * (2 + 4 + 8 + 8)  # one step: bf16, fp32, float64 probs and CDF
    # the shared reward model: its adapter (r 8 on q, v: 2 x (8*16 + 8*12)) and score head, fp32, frozen
    assert generate.parts["reward_model"] == 448 * 4 + 8 * 4
    assert generate.parts["trainable"] == (112 + 8 + 1) * 16  # LoRA + the value head
    reference = phases["reference"]
    assert reference.parts["activations"] == 10 * 8 * 2 + 10 * 136 * 2  # 2 rows x 5 tokens, no grad
    assert reference.parts["logits"] == 4 * 100 * 10  # 2 rows x 2 response tokens, no grad: 10 B / element
    assert phases["old"].parts == reference.parts  # chunked: no graph kept
    update = phases["update"]  # the 4-row minibatch in chunks of 2
    assert update.parts["activations"] == 2 * 10 * 8 * 2 + 2 * (10 * 136 * 2)
    assert update.parts["logits"] == 4 * 100 * 16
    separate = me.estimate(TOY, replace(w, reward_shares_base=False))[0]  # a second copy of the 4-bit base
    assert separate.parts["reward_model"] == me.weight_bytes(TOY, "4bit", "bf16")
    unchunked = {p.name: p for p in me.estimate(TOY, replace(w, rollout_batch_size=None))}
    assert unchunked["generate"].parts["kv_cache"] == 2 * generate.parts["kv_cache"]  # 4 rows at once
    # 4 x 5 tokens with their graph: each of 2 layers keeps its input, one layer recomputed (x 2)
    assert unchunked["old"].parts["activations"] == 2 * 20 * 8 * 2 + 2 * (20 * 136 * 2)


def test_logits_come_in_chunks_of_the_budget():
    w = me.Workload(stage="sft", batch_size=2, seq_length=4, logits_budget=250)  # 250 // 100 = 2 rows at a time
    assert me.estimate(TOY, w)[0].parts["logits"] == 2 * 100 * 16
    assert me.LOGITS_BUDGET == forward.LOGITS_BUDGET


def test_the_issues_7b_figures():
    """Llama-2-7B, 32 prompts x (512 + 128) tokens: 20 GiB of KV cache in fp32 (the residual stream peft's k-bit
    preparation gave), 10 GiB in bf16, 2.5 GiB in chunks of 8; the 4-bit base about 3.6 GiB."""
    llama = me.PRESETS["llama-2-7b"]
    assert me.kv_cache_bytes(llama, 32, 640, "fp32") == 20 * me.GIB
    assert me.kv_cache_bytes(llama, 32, 640, "bf16") == 10 * me.GIB
    assert me.kv_cache_bytes(llama, 8, 640, "bf16") == 2.5 * me.GIB
    assert 3.5 < me.weight_bytes(llama, "4bit", "bf16") / me.GIB < 3.7


def test_smallest_fitting_pool():
    pools = {"l4": 24.0, "a100-40": 40.0, "h100": 80.0}
    assert me.smallest_fitting(17.0, pools) == "l4"
    assert me.smallest_fitting(23.8, pools) == "a100-40"  # + the CUDA context no longer fits 24
    assert me.smallest_fitting(90.0, pools) is None


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_pipeline.cli", "estimate-memory", *args], capture_output=True, text=True, cwd=REPO
    )


def test_cli_llama_7b_recipes_fit_20_gib():
    recipes = sorted(str(p) for p in (REPO / "recipes" / "llama-7b").glob("*.yaml"))
    result = run_cli(*recipes, "--architecture", "llama-2-7b", "--budget-gib", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("<= 20 GiB: fits") == len(recipes) == 5
    assert "generate" in result.stdout and "update" in result.stdout


def test_cli_fails_over_budget_and_on_an_unknown_architecture(tmp_path):
    ppo = str(REPO / "recipes" / "llama-7b" / "ppo.yaml")
    over = run_cli(ppo, "--architecture", "llama-2-7b", "--budget-gib", "6")
    assert over.returncode == 1 and "> 6 GiB: OVER" in over.stdout and "over the 6 GiB budget" in over.stderr
    unknown = run_cli(ppo)  # runs/sft-7b/merged is not on this machine
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "rlhf estimate-memory: error: cannot read the architecture of 'runs/sft-7b/merged' here: pass "
        "--architecture (a preset or a config.json)"
    ]
