"""Chunked PPO passes (rollout_batch_size) give the unchunked results: generation (sampled and greedy, with a
Llama-3-style list of EOS ids), the reference and old passes, the update's gradient; and the LM head's row
chunks over a large (200k) vocabulary. Tiny random-init Llama models built from configs, no tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from rlhf_pipeline.modeling.forward import head_logprobs
from rlhf_pipeline.modeling.generation import sample_responses
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.policy import PolicyWithValue, disable_dropout
from rlhf_pipeline.ppo.trainer import ppo_update
from rlhf_pipeline.training.loop import build_accelerator
from rlhf_pipeline.training.losses import gae_advantages, masked_whiten

LLAMA3_EOS = [7, 8, 9]  # like Llama 3's [128001, 128008, 128009]: any of them ends a response


def tiny_llama(vocab_size: int, eos=LLAMA3_EOS, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # EOS logits follow one hidden feature: rows end at different lengths, chunks stop early
        model.lm_head.weight[eos, 0] += math.log(vocab_size) / 1.5
    return model


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (3 + (5 * i) % 9,), generator=generator).tolist() for i in range(n)]


@pytest.mark.parametrize("vocab", [512, 200_000], ids=["small-vocab", "large-vocab"])
@pytest.mark.parametrize("do_sample", [True, False], ids=["sampled", "greedy"])
def test_chunked_generation_equals_unchunked(vocab, do_sample):
    model = tiny_llama(vocab)
    prompts = prompt_ids(7, vocab)
    rollouts = []
    for chunk in (None, 3, 1):  # 7 rows at once; 3 + 3 + 1; one at a time
        torch.manual_seed(5)
        rollouts.append(
            sample_responses(
                model, prompts, max_new_tokens=12, eos_token_id=LLAMA3_EOS, pad_token_id=0, do_sample=do_sample,
                top_k=50, chunk_size=chunk,
            )
        )  # fmt: skip
    whole = rollouts[0]
    lengths = whole.response_lengths()
    assert whole.has_eos.any() and lengths.min() < lengths.max()  # the EOS list ended some rows early
    for chunked in rollouts[1:]:
        assert chunked.response_start == whole.response_start
        assert torch.equal(chunked.input_ids, whole.input_ids)
        assert torch.equal(chunked.attention_mask, whole.attention_mask)
        assert torch.equal(chunked.response_mask, whole.response_mask)
        assert torch.equal(chunked.has_eos, whole.has_eos)


def ppo_cfg(**overrides) -> PPOConfig:
    fields = dict(model="x", data="x", output="x", lora_r=4, batch_size=6, mini_batch_size=6, ppo_epochs=2)
    return PPOConfig(**{**fields, "learning_rate": 1e-2, **overrides})


def make_policy(vocab: int, cfg: PPOConfig) -> PolicyWithValue:
    model = PolicyWithValue.build(tiny_llama(vocab), cfg)
    disable_dropout(model)
    with torch.no_grad():  # a policy that differs from the reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model.eval()


def rollout_of(model, vocab: int, rows: int = 6):
    torch.manual_seed(5)
    return sample_responses(
        model.policy, prompt_ids(rows, vocab), max_new_tokens=10, eos_token_id=LLAMA3_EOS, pad_token_id=0
    )


@pytest.mark.parametrize("vocab", [512, 200_000], ids=["small-vocab", "large-vocab"])
def test_chunked_reference_and_old_passes_equal_unchunked(vocab):
    model = make_policy(vocab, ppo_cfg())
    rollout = rollout_of(model, vocab)
    reference = model.reference_logprobs(rollout)
    old = model.old_outputs(rollout, keep_graph=False)
    assert not torch.allclose(reference, old.logprobs)  # the adapter is on in one and off in the other
    for chunk in (4, 1):
        torch.testing.assert_close(model.reference_logprobs(rollout, chunk), reference, rtol=0, atol=1e-6)
        chunked = model.old_outputs(rollout, keep_graph=False, chunk=chunk)
        for name in ("logprobs", "values", "entropy"):
            torch.testing.assert_close(getattr(chunked, name), getattr(old, name), rtol=0, atol=1e-5)


def test_chunked_update_gives_the_one_pass_update():
    """A minibatch backpropagated in row chunks (each chunk's means weighted by its share of the minibatch's
    tokens) trains the weights to the same values, with the same logged statistics."""
    vocab = 512
    results = []
    for chunk in (None, 4, 1):  # the 6-row minibatch in one pass; 4 + 2 rows; row by row
        cfg = ppo_cfg(rollout_batch_size=chunk)
        torch.manual_seed(0)
        model = make_policy(vocab, cfg)
        rollout = rollout_of(model, vocab)
        with torch.no_grad():
            old = model.old_outputs(rollout, keep_graph=False)
        mask = rollout.response_mask.float()
        rewards = torch.zeros_like(mask)
        rewards[torch.arange(mask.shape[0]), mask.sum(-1).long() - 1] = torch.linspace(-1, 1, mask.shape[0])
        advantages, returns = gae_advantages(rewards, old.values.float(), mask, 1.0, 0.95)
        advantages = masked_whiten(advantages, mask)
        # SGD: the weights move by the gradient itself (AdamW would divide tiny float differences by tiny moments)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        torch.manual_seed(2)  # same minibatch order
        stats = ppo_update(
            model, optimizer, scheduler, rollout, old.logprobs.detach(), old.values.detach().float(), advantages,
            returns, cfg, build_accelerator(cfg),
        )  # fmt: skip
        assert stats["skipped_updates"] == 0
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((trained, stats))
    (plain, plain_stats), *chunked_runs = results
    start = make_policy(vocab, ppo_cfg())
    start_weights = {n: p for n, p in start.named_parameters() if p.requires_grad}
    assert sum(not torch.allclose(plain[n], start_weights[n]) for n in plain) >= len(plain) // 2  # it trained
    for chunked, stats in chunked_runs:
        for name in plain:
            torch.testing.assert_close(chunked[name], plain[name], atol=1e-5, rtol=1e-4)
        for key in ("policy_loss", "value_loss", "approx_kl", "clipfrac"):
            assert stats[key] == pytest.approx(plain_stats[key], abs=1e-5)


def test_head_logprobs_in_row_chunks_over_a_262k_vocabulary():
    """Gemma 3's 262,144-token vocabulary: a budget of 4 rows' logits gives the one-block log-probs, entropy and
    gradients (each chunk checkpointed)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 262_144, bias=False)
    hidden = torch.randn(10, 16, requires_grad=True)
    labels = torch.randint(0, 262_144, (10,))
    whole, whole_entropy = head_logprobs(head, hidden, labels, with_entropy=True, budget=1 << 40)
    (grad_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked, chunked_entropy = head_logprobs(head, hidden, labels, with_entropy=True, budget=4 * 262_144)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked_entropy, whole_entropy)
    torch.testing.assert_close(grad_chunked, grad_whole)


def test_sft_loss_in_logit_chunks_equals_cross_entropy(monkeypatch):
    """The SFT loss over a 200k vocabulary with a budget of 3 rows' logits: each row's summed token loss equals
    F.cross_entropy on the full logits, and so do the gradients."""
    from rlhf_pipeline.modeling import forward
    from rlhf_pipeline.training.sft import CausalLMLoss

    vocab = 200_000
    model = tiny_llama(vocab)
    ids = torch.randint(10, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt part without loss
    logits = model(input_ids=ids).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100
    ).view(2, -1)
    (grad_expected,) = torch.autograd.grad(expected.sum(), model.lm_head.weight)
    monkeypatch.setattr(forward, "LOGITS_BUDGET", 3 * vocab)
    row_loss, row_tokens = CausalLMLoss(model)(ids, labels)
    torch.testing.assert_close(row_loss, expected.sum(-1), rtol=1e-5, atol=1e-4)
    assert row_tokens.tolist() == [6, 8]  # 8 targets per row, 2 of row 0 masked
    (grad_chunked,) = torch.autograd.grad(row_loss.sum(), model.lm_head.weight)
    torch.testing.assert_close(grad_chunked, grad_expected, rtol=1e-4, atol=1e-6)
