"""`rlhf ppo`: PPO against the reward model with a per-token KL penalty to the SFT model (StackLLaMA step 3).

    rlhf ppo --model runs/sft/merged --reward-model runs/reward --data runs/data --output runs/ppo \\
        --steps 20 --batch-size 8 --mini-batch-size 8 --ppo-epochs 4 --min-new-tokens 32 --max-new-tokens 48

One model in memory: the SFT weights with a trainable LoRA adapter are the policy; the same weights with the
adapter disabled are the frozen reference; a value head on the policy's last hidden states is the critic. Each
PPO step (numbered below as in the code):
  (1) sample a response per prompt          modeling.generation.sample_responses (KV cache, left-padded)
  (2) score it                              reward model at the last real token, normalized; clip; no-EOS penalty
  (3) reference and old log-probs + values  two no-grad passes (adapter off / on)
  (4) per-token KL penalty + final reward   losses.kl_penalty, per_token_rewards, adaptive KL coefficient
  (5) GAE advantages, whitened              losses.gae_advantages, masked_whiten
  (6) clipped policy + value loss           ppo_update: minibatches x ppo_epochs, approx-KL early stop
By role: config.py (options), rollout.py (which prompts, how long), policy.py (policy + reference +
critic on one base), rewards.py (reward sources); the math is training/losses.py, every forward modeling/forward.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf_pipeline.batching.tokenize import encode_prompts
from rlhf_pipeline.data.subsets import read_questions
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import ResponseOutputs
from rlhf_pipeline.modeling.generation import decode_responses, eos_token_ids, sample_responses
from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
from rlhf_pipeline.modeling.lora import save_adapter_and_merged
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.policy import PolicyWithValue, disable_dropout
from rlhf_pipeline.ppo.rewards import FunctionReward, RewardModelScorer, read_reward_model_dir, shape_scores
from rlhf_pipeline.ppo.rollout import prompt_indices, response_length
from rlhf_pipeline.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_pipeline.training.loop import build_accelerator, build_optimizer, build_scheduler, finished_run, \
    set_seed, tracked_run, write_metrics
from rlhf_pipeline.training.losses import AdaptiveKLController, FixedKLController, explained_variance, gae_advantages, kl_penalty, masked_mean, masked_whiten, per_token_rewards, ppo_policy_loss, ppo_value_loss


def run_ppo(cfg: PPOConfig, reward_fn=None) -> dict:
    """Train the policy; `reward_fn(questions, responses, rollout) -> scores` replaces the reward model (tests)."""
    if reward_fn is None and cfg.reward_model is None:
        raise UserError("--reward-model is required (the reward stage's output directory)")
    if reward_fn is None:
        read_reward_model_dir(cfg.reward_model)  # a bad path fails before anything is loaded or logged
    done = finished_run(cfg.output)
    if done is not None:
        return done
    questions = read_questions(cfg.data, "rl", cfg.max_train_samples, cfg.seed)
    if len(questions) < cfg.batch_size:
        raise UserError(f"{cfg.data}/rl.parquet has {len(questions)} questions, fewer than --batch-size {cfg.batch_size}")
    accelerator = build_accelerator(cfg)

    with tracked_run(cfg, "ppo", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:
        set_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model, padding_side="left", trust_remote_code=cfg.trust_remote_code)
        base = load_causal_lm(cfg.model, precision=cfg.precision, quantization=cfg.quantization,
                              trust_remote_code=cfg.trust_remote_code, device=str(accelerator.device))
        model = PolicyWithValue.build(base, cfg)  # LoRA policy + value head; reference = adapter disabled
        disable_dropout(model)
        reward = FunctionReward(reward_fn) if reward_fn is not None else model.attach_reward_model(cfg)
        optimizer = build_optimizer(model.parameters(), cfg)
        minibatches_per_step = -(-cfg.batch_size // cfg.mini_batch_size)
        scheduler = build_scheduler(optimizer, cfg, cfg.steps * cfg.ppo_epochs * minibatches_per_step)
        kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                  else FixedKLController(cfg.init_kl_coef))
        prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, questions, cfg.max_prompt_length)

        start, history, skipped = 0, [], 0
        checkpoint = latest_checkpoint(cfg.output)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model, optimizer, scheduler)
            start, history = state["step"], state["extra"]["history"]
            skipped = state["extra"]["skipped_updates"]
            kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
            tqdm.write(f"resuming from {checkpoint} (step {start})")

        eos_id, pad_id = eos_token_ids(model.policy, tokenizer), tokenizer.pad_token_id  # eos_id: a list
        for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="ppo", unit="step"):
            began = time.perf_counter()
            batch_idx = prompt_indices(step, cfg.batch_size, len(questions), cfg.seed)
            batch_questions = [questions[i] for i in batch_idx]
            timings = {}

            # (1) Sample responses; the length is drawn per step (StackLLaMA's length sampler), from (seed, step).
            max_new = response_length(step, cfg.seed, cfg.min_new_tokens, cfg.max_new_tokens)
            model.eval()
            with accelerator.autocast():
                rollout = sample_responses(
                    model.policy, [prompt_ids[i] for i in batch_idx], max_new_tokens=max_new, eos_token_id=eos_id,
                    pad_token_id=pad_id, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    force_length=cfg.force_length, backend=cfg.generation_backend)
            responses = decode_responses(tokenizer, rollout)
            mask = rollout.response_mask.float()  # [B, R]
            timings["generate"] = time.perf_counter() - began

            # (2) Score: reward model at the last real token (normalized), optional clip and no-EOS penalty.
            tic = time.perf_counter()
            with accelerator.autocast():
                if isinstance(reward, RewardModelScorer):  # keep the raw score too, for the logs
                    raw_scores = reward.raw_scores(batch_questions, responses).float()
                    normalized = reward.normalize(raw_scores)
                else:
                    raw_scores = normalized = reward(batch_questions, responses, rollout).float().cpu()
            scores = shape_scores(normalized, rollout.has_eos, reward_clip=cfg.reward_clip,
                                           missing_eos_penalty=cfg.missing_eos_penalty).to(mask.device)
            timings["score"] = time.perf_counter() - tic

            # (3) Reference log-probs (adapter disabled, no grad) and old log-probs + values. With one minibatch
            # per epoch the old pass IS the first update's forward (same weights, no dropout: pi_old = pi_theta
            # bit for bit), so it keeps its graph and ppo_update reuses it instead of running it again.
            tic = time.perf_counter()
            with torch.no_grad(), accelerator.autocast():
                with model.policy.disable_adapter():
                    ref_logprobs = model(rollout.input_ids, rollout.attention_mask, rollout.response_start).logprobs
            reuse_old_pass = cfg.mini_batch_size >= cfg.batch_size
            model.train(reuse_old_pass)  # train mode only matters for gradient checkpointing
            with torch.set_grad_enabled(reuse_old_pass), accelerator.autocast():
                old = model(rollout.input_ids, rollout.attention_mask, rollout.response_start, with_values=True,
                            with_entropy=True)
            old_logprobs, old_values = old.logprobs.detach(), old.values.detach().float()
            timings["forward"] = time.perf_counter() - tic

            # (4) Per-token KL penalty; the score is added at the last real token.
            kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # [B, R]
            rewards = per_token_rewards(scores, kl, kl_ctl.value, mask)  # [B, R]
            # (5) GAE advantages, whitened over the real tokens of the whole batch.
            advantages, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)

            # (6) Clipped policy and value losses over minibatches and epochs.
            tic = time.perf_counter()
            update = ppo_update(model, optimizer, scheduler, rollout, old_logprobs, old_values, advantages, returns,
                                cfg, accelerator, first_forward=old if reuse_old_pass else None)
            timings["update"] = time.perf_counter() - tic
            skipped += update.pop("skipped_updates")
            sequence_kl = float(kl.sum(-1).mean())
            kl_ctl.update(sequence_kl, cfg.batch_size)

            seconds = time.perf_counter() - began
            n_tokens = float(mask.sum())
            metrics = {
                "ppo/reward_mean": float(scores.mean()), "ppo/reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                "ppo/reward_raw_mean": float(raw_scores.mean()),
                "ppo/kl": sequence_kl, "ppo/kl_coef": kl_ctl.value,
                "ppo/entropy": float(masked_mean(old.entropy, mask)),
                "ppo/response_length": float(mask.sum(-1).mean()), "ppo/eos_rate": float(rollout.has_eos.float().mean()),
                "ppo/explained_variance": update.pop("explained_variance"),
                **{f"ppo/{k}": v for k, v in update.items()},
                "ppo/skipped_updates": float(skipped),
                "ppo/tokens_per_s": n_tokens / seconds, "ppo/samples_per_s": cfg.batch_size / seconds,
                **{f"ppo/time_{k}_s": v for k, v in timings.items()},
            }
            history.append({k.removeprefix("ppo/"): v for k, v in metrics.items()})
            run.log_metrics(metrics, step=step + 1)
            if (step + 1) % cfg.log_generations_every == 0 or step == start:
                run.log_table({"step": [step + 1] * len(responses), "question": batch_questions,
                               "response": responses, "reward": scores.tolist()},
                              artifact_file=f"generations/step_{step + 1:05d}.json")
            if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.steps:
                save_checkpoint(cfg.output, step + 1, model, optimizer, scheduler, extra={
                    "history": history, "skipped_updates": skipped, "kl_ctl": kl_ctl.state_dict()})

        summary = summarize(history, cfg)
        model.detach_reward_model()
        model.value_head.save(Path(cfg.output))
        adapter_dir, merged_dir = save_adapter_and_merged(model.policy, tokenizer, cfg.output)
        model.value_head.save(adapter_dir)
        entry = run.register(merged_dir, name=f"{cfg.registered_model_prefix}-policy", tags={"algorithm": "ppo"})
        summary.update(adapter=str(adapter_dir), merged=str(merged_dir), registered=entry)
        write_metrics(cfg.output, summary)
        return summary

def ppo_update(model, optimizer, scheduler, rollout, old_logprobs, old_values, advantages, returns, cfg,
               accelerator, first_forward=None) -> dict:
    """Step (6): `ppo_epochs` passes of shuffled minibatches over one step's rollouts.

    `first_forward`: the old pass's outputs WITH their graph, used as the forward of the first minibatch when it
    covers the whole batch (the weights have not changed since, so recomputing it would give the same tensors).

    A minibatch whose loss or gradients are not finite is skipped (counted; the optimizer never sees it), so a
    NaN never reaches the weights. An epoch whose mean approx-KL passes `early_stop_kl` ends the update.
    """
    mask = rollout.response_mask.float()
    params = [p for p in model.parameters() if p.requires_grad]
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "vf_clipfrac")}
    skipped, epochs_done = 0, 0
    model.train()  # dropout is off (disable_dropout); train() only enables gradient checkpointing when configured
    for _ in range(cfg.ppo_epochs):
        epoch_kl = []
        for mb in torch.randperm(cfg.batch_size).split(cfg.mini_batch_size):
            if first_forward is not None:
                new = ResponseOutputs(logprobs=first_forward.logprobs[mb], values=first_forward.values[mb],
                                      entropy=None)
                first_forward = None
            else:
                with accelerator.autocast():
                    new = model(rollout.input_ids[mb], rollout.attention_mask[mb], rollout.response_start,
                                with_values=True)
            pg_loss, clipfrac, approx_kl = ppo_policy_loss(new.logprobs, old_logprobs[mb], advantages[mb], mask[mb],
                                                           cfg.cliprange)
            v_loss, vf_clipfrac = ppo_value_loss(new.values.float(), old_values[mb], returns[mb], mask[mb],
                                                 cfg.cliprange_value)
            loss = pg_loss + cfg.vf_coef * v_loss
            if not torch.isfinite(loss):  # checked BEFORE backward: nothing non-finite is ever accumulated
                skipped += 1
                continue
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):  # and the gradients before the step
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("approx_kl", approx_kl),
                               ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac)):
                stats[key].append(float(value.detach()))
            epoch_kl.append(float(approx_kl))
        epochs_done += 1
        if cfg.early_stop_kl is not None and epoch_kl and sum(epoch_kl) / len(epoch_kl) > cfg.early_stop_kl:
            break
    model.eval()
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out.update(skipped_updates=skipped, epochs=float(epochs_done),
               explained_variance=float(explained_variance(old_values, returns, mask)))
    return out

def summarize(history: list[dict], cfg: PPOConfig) -> dict:
    """metrics.json: first/last step reward and KL, steady-state throughput (step 1 = warm-up, excluded)."""
    steady = history[1:] or history
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    steady_seconds = sum(cfg.batch_size / r["samples_per_s"] for r in steady)
    return {
        "steps": len(history), "samples": len(history) * cfg.batch_size,
        "reward_first": history[0]["reward_mean"], "reward_last": history[-1]["reward_mean"],
        "kl_first": history[0]["kl"], "kl_last": history[-1]["kl"], "kl_coef_last": history[-1]["kl_coef"],
        "reward_mean_last5": mean("reward_mean", history[-5:]), "kl_mean_last5": mean("kl", history[-5:]),
        "skipped_updates": history[-1]["skipped_updates"],
        "ppo/samples_per_s": len(steady) * cfg.batch_size / steady_seconds,
        "ppo/tokens_per_s": sum(r["tokens_per_s"] * cfg.batch_size / r["samples_per_s"] for r in steady) / steady_seconds,
        "history": history,
    }
