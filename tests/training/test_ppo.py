"""PPO on tiny models: masks, reference == SFT, sampling/training log-prob agreement, the NaN guard, the shared
reward adapter, resume, and a toy-reward run where the reward rises while the KL stays bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from rlhf_pipeline.batching.padding import pad
from rlhf_pipeline.batching.tokenize import encode_prompts
from rlhf_pipeline.modeling.forward import last_token_index, response_forward
from rlhf_pipeline.modeling.generation import response_mask_from_ids, sample_responses
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.policy import PolicyWithValue, disable_dropout
from rlhf_pipeline.ppo.rewards import RewardModelInfo, RewardModelScorer, SharedBaseRewardModel, same_backbone
from rlhf_pipeline.ppo.trainer import ppo_update, run_ppo
from rlhf_pipeline.results import StageResult

EOS = 2  # <|im_end|> in the SmolLM2 tokenizer: both eos and pad


# --- fixtures ----------------------------------------------------------------------------------------------------


def write_pairs(data_dir: Path, subset: str, n_questions: int, pairs_per_question: int = 1) -> None:
    rows = []
    for q in range(n_questions):
        for p in range(pairs_per_question):
            rows.append(
                {
                    "qid": q,
                    "site": "beer",
                    "question": f"Which beer style number {q} goes with cheese {p}?",
                    "response_j": f"A malty amber ale, served cool, with aged cheddar {q}.",
                    "response_k": f"No idea {q}.",
                    "score_j": 5,
                    "score_k": 1,
                    "answer_id_j": 1000 + 2 * q,
                    "answer_id_k": 1001 + 2 * q,
                }
            )
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(data_dir / f"{subset}.parquet")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl-data")
    write_pairs(root, "rl", 24, pairs_per_question=2)
    write_pairs(root, "reward", 24)
    return root


@pytest.fixture(scope="module")
def peaky_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its final norm scaled x10: an LM-like, peaked next-token distribution (entropy ~5 nats
    instead of uniform ~10.8) while the residual stream stays small enough for LoRA to move it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("peaky") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def make_policy(model_dir, **overrides) -> PolicyWithValue:
    from rlhf_pipeline.modeling.loading import load_causal_lm

    cfg = PPOConfig(model=str(model_dir), data="unused", output="unused", lora_r=4, **overrides)
    model = PolicyWithValue.build(load_causal_lm(str(model_dir), device="cpu"), cfg)
    disable_dropout(model)
    return model.eval()


def randomize_lora(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def prompts(tokenizer, n=4):
    questions = [f"Which hops for beer {i}?" + " really" * i for i in range(n)]  # different lengths -> left padding
    return questions, encode_prompts(tokenizer, "Question: {question}\n\nAnswer: {answer}", questions, 64)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf_pipeline.modeling.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), padding_side="left")


# --- masks and padding -------------------------------------------------------------------------------------------


def test_response_mask_keeps_the_first_eos_and_drops_what_follows():
    ids = torch.tensor([[5, 6, EOS, EOS, EOS], [5, EOS, 7, EOS, 9], [5, 6, 7, 8, 9]])
    mask, has_eos = response_mask_from_ids(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_long_prompts_lose_the_question_end_not_the_template_tail(tokenizer):
    ids = encode_prompts(tokenizer, "Question: {question}\n\nAnswer: {answer}", ["hop " * 200], 32)[0]
    assert len(ids) == 32
    assert tokenizer.decode(ids).endswith("\n\nAnswer: ")


def _with_special_tokens(tokenizer, template: str):
    """A copy of `tokenizer` whose post-processor adds special tokens the way Gemma's or Llama 3's does ("<bos> $A")
    or with an EOS after the text too ("<bos> $A <eos>"); SmolLM2's own adds none."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    specials = [(tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)]
    single = template.replace("<bos>", tok.bos_token).replace("<eos>", tok.eos_token)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    return tok


@pytest.mark.parametrize("template", ["<bos> $A", "<bos> $A <eos>"])
def test_prompts_start_with_the_bos_the_training_documents_start_with(tokenizer, template):
    """A tokenizer that adds a BOS (Gemma, Llama 3, Mistral): the prompts PPO and evaluate sample from start with
    it, as the SFT documents do (`tokenize_documents`), even when a long question is cut; an EOS the tokenizer
    appends after a text never ends a prompt. SmolLM2's tokenizer adds nothing, and its prompts stay as they were."""
    from rlhf_pipeline.batching.tokenize import tokenize_documents
    from rlhf_pipeline.data.prompts import format_example, format_prompt

    template_text = "Question: {question}\n\nAnswer: {answer}"
    bos_tok = _with_special_tokens(tokenizer, template)
    bos = bos_tok.bos_token_id
    document = tokenize_documents(bos_tok, [format_example(template_text, "Which hops?", "Cascade.")])[0]
    short, long = encode_prompts(bos_tok, template_text, ["Which hops?", "hop " * 200], 32)
    assert document[0] == bos and short[0] == bos and long[0] == bos
    question_ids = tokenizer(format_prompt(template_text, "Which hops?"), add_special_tokens=False)["input_ids"]
    assert short == [bos] + question_ids
    assert short == document[: len(short) - 1] + [short[-1]]  # the document goes on as the prompt (to "Answer:")
    assert len(long) == 32 and bos_tok.decode(long[1:]).endswith("\n\nAnswer: ") and long.count(bos) == 1
    assert bos_tok.eos_token_id not in short + long

    plain = encode_prompts(tokenizer, template_text, ["Which hops?"], 32)[0]
    assert plain == short[1:] and plain[0] != bos


def test_padding_changes_no_logprob_and_post_eos_garbage_changes_no_loss(tiny_model_dir, tokenizer):
    """Left prompt padding: each row's log-probs equal those of the row run alone. Post-EOS padding: whatever
    sits there (other tokens, other log-probs, values) leaves KL, advantages and losses unchanged."""
    from rlhf_pipeline.training.losses import (
        gae_advantages,
        kl_penalty,
        masked_whiten,
        per_token_rewards,
        ppo_policy_loss,
        ppo_value_loss,
    )

    model = make_policy(tiny_model_dir)
    randomize_lora(model)
    _, prompt_ids = prompts(tokenizer)
    torch.manual_seed(0)
    rollout = sample_responses(
        model.policy, prompt_ids, max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS, force_length=True
    )
    with torch.no_grad():
        batched = model(rollout.input_ids, rollout.attention_mask, rollout.response_start).logprobs
        for row, prompt in enumerate(prompt_ids):
            alone = torch.tensor([prompt + rollout.response_ids[row].tolist()])
            single = model(alone, torch.ones_like(alone), len(prompt)).logprobs[0]
            assert torch.allclose(batched[row], single, atol=1e-4)

    # post-EOS: two batches equal on the real tokens, different (garbage) on the padding
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    real = {k: torch.randn(2, 5) for k in ("logp", "old", "ref", "values", "new_values")}
    garbage = {k: torch.where(mask.bool(), v, torch.full_like(v, 1e4)) for k, v in real.items()}

    def losses(t):
        kl = kl_penalty(t["old"], t["ref"], "k1") * mask
        rewards = per_token_rewards(torch.tensor([1.0, -1.0]), kl, 0.1, mask)
        adv, ret = gae_advantages(rewards, t["values"], mask, 1.0, 0.95)
        adv = masked_whiten(adv, mask)
        pg = ppo_policy_loss(t["logp"], t["old"], adv, mask, 0.2)
        vf = ppo_value_loss(t["new_values"], t["values"], ret, mask, 0.2)
        return torch.stack([kl.sum(), adv.sum(), *pg, *vf])

    assert torch.allclose(losses(real), losses(garbage), atol=1e-5)


# --- the reference model and the sampling distribution -----------------------------------------------------------


@pytest.mark.parametrize("critic_trains_policy", [True, False])
def test_critic_gradient_reaches_the_policy_only_when_asked(tiny_model_dir, tokenizer, critic_trains_policy):
    """The value loss's gradient: always on the value head; on the policy's LoRA weights only with
    critic_trains_policy (the shared trunk), never with it off, while the policy loss still reaches them."""
    model = make_policy(tiny_model_dir, critic_trains_policy=critic_trains_policy)
    randomize_lora(model)
    with torch.no_grad():  # a critic that has learned something: a zero head passes no gradient back at all
        model.value_head.summary.weight.normal_(0.0, 0.1)
    _, prompt_ids = prompts(tokenizer)
    rollout = sample_responses(model.policy, prompt_ids, max_new_tokens=5, eos_token_id=EOS, pad_token_id=EOS)
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    out = model(*args, with_values=True)
    ((out.values - 1.0) ** 2).sum().backward()
    assert float(model.value_head.summary.weight.grad.abs().sum()) > 0
    reached = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)
    assert reached == critic_trains_policy
    model.zero_grad(set_to_none=True)
    model(*args, with_values=True).logprobs.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)


def test_reference_logprobs_equal_the_sft_model(tiny_model_dir, tokenizer):
    from rlhf_pipeline.modeling.loading import load_causal_lm

    model = make_policy(tiny_model_dir)
    randomize_lora(model)  # a trained-looking adapter, so "adapter on" really differs
    sft = load_causal_lm(str(tiny_model_dir), device="cpu").eval()
    _, prompt_ids = prompts(tokenizer)
    rollout = sample_responses(model.policy, prompt_ids, max_new_tokens=5, eos_token_id=EOS, pad_token_id=EOS)
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start)
    with torch.no_grad():
        with model.policy.disable_adapter():
            ref = model(*args).logprobs
        plain = response_forward(sft, *args).logprobs
        policy = model(*args).logprobs
    assert torch.allclose(ref, plain, atol=1e-5)
    assert not torch.allclose(policy, plain, atol=1e-3)


def test_training_logprobs_match_the_sampling_distribution(tiny_model_dir, tokenizer):
    """The log-probs PPO trains on are those generate() sampled from (same positions, same padding)."""
    model = make_policy(tiny_model_dir)
    randomize_lora(model)
    _, prompt_ids = prompts(tokenizer)
    query, query_mask = pad(prompt_ids, EOS, "left")
    torch.manual_seed(0)
    out = model.policy.generate(
        input_ids=query,
        attention_mask=query_mask,
        max_new_tokens=6,
        do_sample=True,
        top_k=0,
        min_new_tokens=6,
        pad_token_id=EOS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    response = out.sequences[:, query.shape[1] :]
    sampled = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)
    sampled = sampled.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    mask, _ = response_mask_from_ids(response, EOS)
    with torch.no_grad():
        trained = model(out.sequences, torch.cat([query_mask, mask], 1), query.shape[1]).logprobs
    assert torch.allclose(sampled, trained, atol=1e-4)


# --- the dropout-off invariant: pi_old == pi_theta before the first update -----------------------------------


def test_disable_dropout_zeros_lora_fast_dropout(tiny_model_dir, tokenizer):
    """cpu_kernels=eager swaps LoRA's nn.Dropout for FastDropout (an nn.Dropout subclass): disable_dropout must
    switch it off too, so a train-mode forward (PPO's update) gives the eval-mode log-probs bit for bit."""
    from rlhf_pipeline.cpu.fast_dropout import FastDropout
    from rlhf_pipeline.modeling.loading import load_causal_lm

    cfg = PPOConfig(model=str(tiny_model_dir), data="x", output="x", lora_r=4, lora_dropout=0.1, cpu_kernels="eager")
    model = PolicyWithValue.build(load_causal_lm(str(tiny_model_dir), device="cpu"), cfg)
    fast = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert fast and all(m.p == pytest.approx(0.1) for m in fast)
    randomize_lora(model)  # B != 0: LoRA's input dropout reaches the output
    _, prompt_ids = prompts(tokenizer)
    torch.manual_seed(0)
    rollout = sample_responses(
        model.policy, prompt_ids, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS, force_length=True
    )
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start)

    def old_and_new():
        with torch.no_grad():
            old = model.eval()(*args).logprobs  # the old pass (no grad)
            new = model.train()(*args).logprobs  # the update's forward (train mode)
        return old, new

    old, new = old_and_new()
    assert not torch.equal(old, new)  # dropout still on: the ratio would not be 1 (the check below can fail)
    disable_dropout(model)
    assert all(m.p == 0.0 and m.threshold == 32768 for m in fast)
    old, new = old_and_new()
    assert torch.equal(old, new)
    assert torch.equal(torch.exp(new - old), torch.ones_like(old))


def test_disable_dropout_also_zeros_the_attention_dropout_transformers_reads_in_train_mode(tiny_model_dir, tokenizer):
    """Llama (like most transformers models) keeps attention dropout as a float attribute, not an nn.Dropout, and
    applies it whenever the module is in train mode -- as it is in ppo_update."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.1)
    cfg = PPOConfig(model=str(tiny_model_dir), data="x", output="x", lora_r=4)
    model = PolicyWithValue.build(base, cfg)
    _, prompt_ids = prompts(tokenizer)
    ids, mask = pad(prompt_ids, EOS, "left")
    args = (ids, mask, ids.shape[1] - 3)
    with torch.no_grad():
        assert not torch.equal(model.eval()(*args).logprobs, model.train()(*args).logprobs)
        disable_dropout(model)
        assert torch.equal(model.eval()(*args).logprobs, model.train()(*args).logprobs)


@pytest.mark.parametrize("dropout_off", [True, False])
def test_dropout_off_gives_ratio_one_before_each_steps_first_update(
    tiny_model_dir, data_dir, tmp_path, mlflow_sqlite, monkeypatch, dropout_off
):
    """A whole run with lora_dropout=0.1 and cpu_kernels=eager, instrumented: in every PPO step the first
    minibatch's new log-probs (train mode, recomputed: minibatch < batch) equal the old pass's bit for bit, so
    ratio == 1, approx_kl == 0 and clipfrac == 0 before the step's first optimizer step. With disable_dropout
    made a no-op the same check fails (from step 2 on, once LoRA's B is no longer zero)."""
    import rlhf_pipeline.ppo.trainer as trainer

    if not dropout_off:
        monkeypatch.setattr(trainer, "disable_dropout", lambda model: None)
    first = {"pending": False, "seen": []}
    real_update, real_loss = trainer.ppo_update, trainer.ppo_policy_loss

    def update(*args, **kwargs):
        first["pending"] = True
        return real_update(*args, **kwargs)

    def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
        out = real_loss(logprobs, old_logprobs, advantages, mask, clip_range)
        if first["pending"]:
            first["pending"] = False
            ratio = torch.exp(logprobs.detach() - old_logprobs)
            first["seen"].append((torch.equal(ratio, torch.ones_like(ratio)), float(out[1]), float(out[2])))
        return out

    monkeypatch.setattr(trainer, "ppo_update", update)
    monkeypatch.setattr(trainer, "ppo_policy_loss", policy_loss)

    def dense(questions, responses, rollout):  # every response scores differently: LoRA's B moves at step 1
        ids, mask = rollout.response_ids.float(), rollout.response_mask.float()
        return ((ids % 97) * mask).sum(1) / mask.sum(1) / 97

    cfg = ppo_cfg(
        tiny_model_dir,
        data_dir,
        tmp_path / "ppo",
        steps=3,
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        lora_dropout=0.1,
        cpu_kernels="eager",
        learning_rate=1e-2,
    )
    run_ppo(cfg, reward_fn=dense)
    assert len(first["seen"]) == 3
    if dropout_off:
        assert first["seen"] == [(True, 0.0, 0.0)] * 3, first["seen"]  # (ratio == 1, clipfrac, approx_kl)
    else:
        assert first["seen"][0][0]  # step 1: B == 0, the adapter adds nothing whatever dropout does
        assert not any(equal for equal, _, _ in first["seen"][1:]), first["seen"]
        assert all(approx_kl > 0 for _, _, approx_kl in first["seen"][1:]), first["seen"]


# --- NaN guard ---------------------------------------------------------------------------------------------------


def _update_inputs(model, tokenizer):
    _, prompt_ids = prompts(tokenizer)
    rollout = sample_responses(
        model.policy, prompt_ids, max_new_tokens=4, eos_token_id=EOS, pad_token_id=EOS, force_length=True
    )
    with torch.no_grad():
        old = model(rollout.input_ids, rollout.attention_mask, rollout.response_start, with_values=True)
    advantages = torch.randn_like(old.logprobs)
    return rollout, old.logprobs, old.values, advantages, old.values + advantages


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_nan_guard_skips_the_update_and_keeps_the_weights(tiny_model_dir, tokenizer, where):
    from rlhf_pipeline.training.loop import build_accelerator, build_optimizer, build_scheduler

    model = make_policy(tiny_model_dir)
    cfg = PPOConfig(model="x", data="x", output="x", batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    rollout, old_logprobs, old_values, advantages, returns = _update_inputs(model, tokenizer)
    hook = None
    if where == "loss":
        from rlhf_pipeline.training.losses import masked_whiten

        advantages[0, 0] = float("nan")  # e.g. a NaN reward: whitening spreads it over the whole batch
        advantages = masked_whiten(advantages, rollout.response_mask)
    else:  # finite loss, NaN gradient on one LoRA weight
        param = next(p for n, p in model.named_parameters() if "lora_B" in n)
        hook = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = _trainable(model)
    stats = ppo_update(
        model, optimizer, scheduler, rollout, old_logprobs, old_values, advantages, returns, cfg, build_accelerator(cfg)
    )
    if hook is not None:
        hook.remove()
    assert stats["skipped_updates"] == 4  # 2 epochs x 2 minibatches, all refused
    after = _trainable(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert not optimizer.state  # the optimizer never stepped


def test_reusing_the_old_pass_as_the_first_forward_gives_the_same_update(tiny_model_dir, tokenizer):
    """One minibatch per epoch: the old pass (run with its graph) stands in for the first update's forward; the
    weights after 2 epochs equal those of the run that recomputes it."""
    from rlhf_pipeline.training.loop import build_accelerator, build_optimizer, build_scheduler

    cfg = PPOConfig(model="x", data="x", output="x", batch_size=4, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-2)
    results = []
    for reuse in (False, True):
        torch.manual_seed(0)
        model = make_policy(tiny_model_dir)
        randomize_lora(model)
        start = _trainable(model)
        optimizer = build_optimizer(model.parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg, 10)
        torch.manual_seed(1)
        rollout, old_logprobs, old_values, advantages, returns = _update_inputs(model, tokenizer)
        first = None
        if reuse:
            model.train()
            first = model(rollout.input_ids, rollout.attention_mask, rollout.response_start, with_values=True)
            assert torch.equal(first.logprobs.detach(), old_logprobs)  # pi_old == pi_theta before the update
        torch.manual_seed(2)  # same minibatch order
        stats = ppo_update(
            model,
            optimizer,
            scheduler,
            rollout,
            old_logprobs,
            old_values,
            advantages,
            returns,
            cfg,
            build_accelerator(cfg),
            first_forward=first,
        )
        assert stats["skipped_updates"] == 0
        after = _trainable(model)
        assert sum(not torch.equal(after[n], start[n]) for n in start) >= len(start) // 2  # it did train
        results.append((after, stats))
    (plain, plain_stats), (reused, reused_stats) = results
    for name in plain:
        torch.testing.assert_close(reused[name], plain[name], atol=1e-6, rtol=1e-5)
    assert reused_stats["policy_loss"] == pytest.approx(plain_stats["policy_loss"], abs=1e-6)


# --- the reward model --------------------------------------------------------------------------------------------


def test_shared_reward_adapter_scores_like_the_separate_reward_model(tiny_model_dir, reward_model_dir):
    """The reward model as a second adapter on the policy's base gives the separate model's scores, read at the
    last real token; the policy adapter alone stays trainable."""
    template = "Question: {question}\n\nAnswer: {answer}"
    separate = RewardModelScorer.load(reward_model_dir, template=template, device="cpu")
    model = make_policy(tiny_model_dir, reward_model=str(reward_model_dir))
    cfg = PPOConfig(model=str(tiny_model_dir), data="x", output="x", reward_model=str(reward_model_dir))
    shared = model.attach_reward_model(cfg)
    assert isinstance(shared, SharedBaseRewardModel)
    questions = ["Best hops?", "Is lager a beer? " * 3]
    responses = ["Citra and Mosaic.", "Yes, a bottom-fermented one, usually served cold and crisp."]
    raw = separate.raw_scores(questions, responses)
    assert torch.allclose(shared.raw_scores(questions, responses), raw, atol=1e-4)
    assert torch.allclose(shared(questions, responses), (raw - 0.5) / 2.0, atol=1e-4)  # metrics.json mean/std
    # padding does not move the score: each text alone scores the same as in the batch
    assert torch.allclose(separate.raw_scores(questions[1:], responses[1:]), raw[1:], atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n or n.startswith("value_head") for n in trainable)
    model.detach_reward_model()
    assert "reward" not in model.policy.peft_config


def test_an_over_long_text_keeps_its_end_and_its_bos():
    """The reward model reads its score at the last token: a text over max_length keeps its end, and its leading
    BOS (the model was trained with one at position 0); one that fits, or lacks the BOS, is cut as before."""
    from rlhf_pipeline.batching.tokenize import keep_end

    bos = 1
    text = [bos, 10, 11, 12, 13, 14, EOS]
    assert keep_end(text, 4, head=[bos]) == [bos, 13, 14, EOS]
    assert keep_end(text, 4) == [12, 13, 14, EOS]  # no special prefix (SmolLM2, Qwen)
    assert keep_end(text[1:], 4, head=[bos]) == [12, 13, 14, EOS]  # a text without it gets none added
    assert keep_end(text, 7, head=[bos]) == text


def test_the_scorer_scores_an_over_long_text_on_its_end_after_its_bos(reward_model_dir):
    """The separate reward model with a BOS-first tokenizer and a short max_length: the score of a long answer is
    the model's score on BOS + the text's last max_length - 1 tokens."""
    from rlhf_pipeline.batching.tokenize import tokenize_documents
    from rlhf_pipeline.data.prompts import format_example

    template = "Question: {question}\n\nAnswer: {answer}"
    scorer = RewardModelScorer.load(reward_model_dir, template=template, device="cpu", max_length=12)
    scorer.tokenizer = _with_special_tokens(scorer.tokenizer, "<bos> $A")
    question, answer = "Best hops?", "Citra, Mosaic and Simcoe, late in the boil and as a dry hop too."
    ids = tokenize_documents(scorer.tokenizer, [format_example(template, question, answer)])[0]
    assert len(ids) > 12 and ids[0] == scorer.tokenizer.bos_token_id
    by_hand = torch.tensor([[ids[0]] + ids[-11:]])
    expected = scorer._score_batch(by_hand, torch.ones_like(by_hand))
    torch.testing.assert_close(scorer.raw_scores([question], [answer]), expected)
    cut_without_bos = torch.tensor([ids[-12:]])
    assert not torch.allclose(scorer._score_batch(cut_without_bos, torch.ones_like(cut_without_bos)), expected)


def test_reward_adapter_from_another_base_is_not_shared(tiny_model_dir, reward_model_dir, tmp_path):
    """An SFT model that differs from the reward model's base only in q/v (what LoRA SFT changes) must not get
    the reward adapter on top of its weights: the scorer falls back to the separate reward model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(9)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    randomize_lora(sft)
    sft.merge_and_unload().save_pretrained(tmp_path / "sft", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "sft")
    model = make_policy(tmp_path / "sft")
    cfg = PPOConfig(model=str(tmp_path / "sft"), data="x", output="x", reward_model=str(reward_model_dir))
    scorer = model.attach_reward_model(cfg)
    assert not isinstance(scorer, SharedBaseRewardModel)
    assert isinstance(scorer, RewardModelScorer)


def test_same_backbone_on_a_bf16_base(tiny_model_dir, tmp_path):
    """bf16 (the CPU recipes' precision): a reward model merged in bf16 on the policy's own base is recognized (the
    merge's rounding is redone exactly), one on a base whose q/v an SFT LoRA changed is not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def reward_dir(base_dir, out):
        torch.manual_seed(3)
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.bfloat16)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
        )
        for param in model.parameters():  # trained adapters are fp32 (apply_lora), merged into bf16
            if param.requires_grad:
                param.data = param.data.float()
        randomize_lora(model)
        model.save_pretrained(out / "adapter")
        model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
        return RewardModelInfo(merged_dir=out / "merged", adapter_dir=out / "adapter", metrics={})

    torch.manual_seed(9)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a small SFT change, ~1 % of the q/v weights
    sft.merge_and_unload().to(torch.bfloat16).save_pretrained(tmp_path / "sft", safe_serialization=True)
    policy_base = AutoModelForCausalLM.from_pretrained(tmp_path / "sft", dtype=torch.bfloat16)
    assert same_backbone(policy_base, reward_dir(tmp_path / "sft", tmp_path / "rm-on-sft"))
    raw = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    raw.save_pretrained(tmp_path / "raw", safe_serialization=True)
    assert not same_backbone(policy_base, reward_dir(tmp_path / "raw", tmp_path / "rm-on-raw"))


def test_last_token_index_for_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


# --- whole runs --------------------------------------------------------------------------------------------------

TARGET = 216  # the tiny peaky model's most probable token on these prompts (~20% at the first answer position)


def target_share(questions, responses, rollout):
    """Toy reward: the share of TARGET among the real response tokens."""
    ids, mask = rollout.response_ids, rollout.response_mask.float()
    return ((ids == TARGET).float() * mask).sum(1) / mask.sum(1)


def ppo_cfg(model_dir, data_dir, output, **overrides) -> PPOConfig:
    base = dict(
        model=str(model_dir),
        data=str(data_dir),
        output=str(output),
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        min_new_tokens=4,
        max_new_tokens=4,
        force_length=True,
        learning_rate=2e-3,
        init_kl_coef=0.01,
        lora_r=8,
        max_prompt_length=64,
        register_model=False,
        save_steps=100,
        log_generations_every=5,
        seed=0,
    )
    base.update(overrides)
    return PPOConfig(**base)


def test_toy_reward_rises_with_bounded_kl(peaky_model_dir, data_dir, tmp_path, mlflow_sqlite):
    import mlflow

    cfg = ppo_cfg(peaky_model_dir, data_dir, tmp_path / "ppo", steps=16, register_model=True)
    summary = run_ppo(cfg, reward_fn=target_share)
    assert isinstance(summary, StageResult)
    assert (summary.stage, summary.status, summary.output, summary.processes) == ("ppo", "trained", str(cfg.output), 1)
    rewards = [h["reward_mean"] for h in summary.history]
    kls = [h["kl"] for h in summary.history]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, rewards
    assert max(kls) < 10.0 and sum(kls[-4:]) / 4 > 0, kls
    assert summary.skipped_updates == 0

    out = tmp_path / "ppo"
    for path in ("adapter/adapter_config.json", "adapter/value_head.safetensors", "merged/config.json", "metrics.json"):
        assert (out / path).is_file(), path
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_first"] == rewards[0] and metrics["ppo/samples_per_s"] > 0
    for key in (
        "reward_last",
        "kl_first",
        "kl_last",
        "kl_coef_last",
        "reward_mean_last5",
        "kl_mean_last5",
        "steps",
        "samples",
        "skipped_updates",
        "ppo/tokens_per_s",
        "adapter_dir",
        "merged_dir",
    ):
        assert key in metrics, key
    assert metrics["history"] == json.loads(json.dumps(summary.history))  # (NaN -> null in the file)
    assert StageResult.read(out) == summary
    (registered,) = summary.registered
    assert metrics["registered"] == [registered.model_dump()]
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(registered.run_id)
    for key in (
        "ppo/reward_mean",
        "ppo/reward_std",
        "ppo/kl",
        "ppo/kl_coef",
        "ppo/entropy",
        "ppo/approx_kl",
        "ppo/clipfrac",
        "ppo/value_loss",
        "ppo/policy_loss",
        "ppo/explained_variance",
        "ppo/response_length",
        "ppo/tokens_per_s",
        "ppo/samples_per_s",
        "ppo/skipped_updates",
    ):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "ppo/reward_mean")) == 16
    assert (registered.name, registered.uri) == ("rlhf-policy", f"models:/rlhf-policy/{registered.version}")
    version = client.get_model_version("rlhf-policy", registered.version)
    assert version.tags["algorithm"] == "ppo" and version.tags["stage"] == "ppo"
    # the samples of steps 1, 5, 10, 15 (log_generations_every=5) in ONE long table, in step order
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/generations/samples.json")
    assert table["columns"] == ["step", "question", "model", "response", "reward"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["step"] for r in rows] == [s for s in (1, 5, 10, 15) for _ in range(cfg.batch_size)]
    assert {r["model"] for r in rows} == {"ppo"} and all(isinstance(r["reward"], float) for r in rows)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "generations")] == ["generations/samples.json"]
    # 4 epochs x 2 minibatches: the update's ratio statistics are measured, and non-zero, at every step
    for key in ("ppo/approx_kl", "ppo/clipfrac"):
        assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, key)), key
    assert "ppo/curves.png" in [a.path for a in client.list_artifacts(run.info.run_id, "ppo")]


def question_only_reward(questions, responses, rollout):
    """A reward no answer can change: it depends on the question alone."""
    return [float(len(q) % 7) for q in questions]


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_leave_one_out_baseline_removes_what_only_the_question_decides(tiny_model_dir, data_dir, tmp_path, baseline):
    """A score that depends on the question only (and no KL penalty): with leave_one_out every advantage is 0, so
    the policy's LoRA B matrices (initialized at 0) and the value head stay exactly at their start; without the
    baseline, the between-question spread moves them (the noise the baseline removes from real runs)."""
    from safetensors.torch import load_file

    cfg = ppo_cfg(
        tiny_model_dir,
        data_dir,
        tmp_path / "ppo",
        steps=1,
        batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        samples_per_prompt=4,
        reward_baseline=baseline,
        init_kl_coef=0.0,
        adaptive_kl=False,
    )
    run_ppo(cfg, reward_fn=question_only_reward)
    adapter = load_file(tmp_path / "ppo/adapter/adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    value_head = load_file(tmp_path / "ppo/adapter/value_head.safetensors")
    moved = any(bool(t.abs().max() > 0) for t in lora_b) or any(bool(t.abs().max() > 0) for t in value_head.values())
    assert lora_b and moved == (baseline == "none")


def test_samples_per_prompt_repeats_each_prompt_in_a_row_and_keeps_groups_on_one_process():
    from types import SimpleNamespace

    from rlhf_pipeline.ppo.rollout import prompt_indices, step_prompts

    questions = [f"q{i}" for i in range(10)]
    prompt_ids = [[i] for i in range(10)]
    cfg = SimpleNamespace(batch_size=8, samples_per_prompt=2, seed=3)
    whole, ids = step_prompts(5, questions, prompt_ids, cfg)
    assert len(whole) == 8 and len(set(whole)) == 4
    assert all(whole[i] == whole[i + 1] for i in range(0, 8, 2)) and [q[0] for q in ids] == [int(q[1:]) for q in whole]
    shares = [step_prompts(5, questions, prompt_ids, cfg, rank, 2)[0] for rank in range(2)]
    assert shares[0] + shares[1] == whole and not set(shares[0]) & set(shares[1])
    single = SimpleNamespace(batch_size=4, samples_per_prompt=1, seed=3)
    assert step_prompts(5, questions, prompt_ids, single)[0] == [questions[i] for i in prompt_indices(5, 4, 10, 3)]


def test_samples_per_prompt_options_are_checked(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        ppo_cfg(tiny_model_dir, data_dir, tmp_path, batch_size=8, mini_batch_size=8, samples_per_prompt=3)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ppo_cfg(tiny_model_dir, data_dir, tmp_path, reward_baseline="leave_one_out")


@pytest.mark.parametrize("epochs", [1, 2])
def test_ratio_statistics_are_logged_only_when_the_update_can_move_them(
    peaky_model_dir, data_dir, tmp_path, mlflow_sqlite, epochs
):
    """One epoch of one minibatch: the only minibatch is the one before any optimizer step, where ratio = 1 and
    the values are the old ones, so approx_kl, clipfrac and vf_clipfrac are 0 by construction: not logged. A
    second epoch measures them after the first step: non-zero."""
    from mlflow.tracking import MlflowClient

    cfg = ppo_cfg(
        peaky_model_dir, data_dir, tmp_path / "ppo", steps=2, batch_size=8, mini_batch_size=8, ppo_epochs=epochs
    )
    result = run_ppo(cfg, reward_fn=target_share)
    run_id = json.loads((tmp_path / "ppo" / "run.json").read_text())["mlflow_run_id"]
    logged = MlflowClient().get_run(run_id).data.metrics
    assert "ppo/policy_loss" in logged and "ppo/value_loss" in logged
    ratio_keys = ("approx_kl", "clipfrac", "vf_clipfrac")
    if epochs == 1:
        assert not any(f"ppo/{k}" in logged for k in ratio_keys), sorted(logged)
        assert not any(k in h for h in result.history for k in ratio_keys)
    else:
        assert all(h["approx_kl"] > 0 and h["clipfrac"] > 0 for h in result.history), [
            {k: h.get(k) for k in ("reward_mean", *ratio_keys)} for h in result.history
        ]
        assert logged["ppo/approx_kl"] == result.history[-1]["approx_kl"]


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path, mlflow_sqlite):
    small = dict(
        steps=4,
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        save_steps=2,
        min_new_tokens=3,
        max_new_tokens=5,
        force_length=False,
    )
    straight = run_ppo(ppo_cfg(tiny_model_dir, data_dir, tmp_path / "straight", **small), reward_fn=target_share)

    calls = {"n": 0}

    def crashing(questions, responses, rollout):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3 of 4: the step-2 checkpoint exists
            raise Interrupted()
        return target_share(questions, responses, rollout)

    cfg = ppo_cfg(tiny_model_dir, data_dir, tmp_path / "resumed", **small)
    with pytest.raises(Interrupted):
        run_ppo(cfg, reward_fn=crashing)
    assert (tmp_path / "resumed" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = run_ppo(cfg, reward_fn=target_share)
    assert resumed.steps == 4 and resumed.status == "trained"
    for a, b in zip(straight.history, resumed.history):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"]) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    again = run_ppo(cfg, reward_fn=target_share)  # a finished run is not redone
    assert again.status == "reused" and again.steps == 4 and again.reward_last == resumed.reward_last
    assert again.registered == [] and StageResult.read(cfg.output).status == "trained"


def test_ppo_with_the_reward_model_dir_end_to_end(tiny_model_dir, reward_model_dir, data_dir, tmp_path, mlflow_sqlite):
    cfg = ppo_cfg(
        tiny_model_dir,
        data_dir,
        tmp_path / "ppo",
        steps=2,
        batch_size=4,
        mini_batch_size=4,
        ppo_epochs=1,
        reward_model=str(reward_model_dir),
        reward_clip=3.0,
        missing_eos_penalty=1.0,
        value_head_init="reward",
        force_length=False,
        kl_estimator="k3",
    )
    summary = run_ppo(cfg)
    assert summary.steps == 2 and all(abs(h["reward_mean"]) <= 4.0 for h in summary.history)
    assert all(h["kl"] >= 0 for h in summary.history)  # k3 is never negative


def test_cli_reports_a_missing_reward_model_in_one_line(tmp_path, data_dir, capsys):
    from rlhf_pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "ppo",
                "--data",
                str(data_dir),
                "--output",
                str(tmp_path / "o"),
                "--reward-model",
                str(tmp_path / "nope"),
                "--tracking-uri",
                f"sqlite:///{tmp_path}/m.db",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward model not found" in err[0]
