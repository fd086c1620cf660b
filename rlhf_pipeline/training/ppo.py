"""`rlhf ppo`: PPO against the reward model with a per-token KL penalty to the SFT model (StackLLaMA step 3).

    rlhf ppo --model runs/sft/merged --reward-model runs/reward --data runs/data --output runs/ppo \\
        --steps 20 --batch-size 8 --mini-batch-size 8 --ppo-epochs 4 --min-new-tokens 32 --max-new-tokens 48

One model in memory: the SFT weights with a trainable LoRA adapter are the policy; the same weights with the
adapter disabled are the frozen reference; a value head on the policy's last hidden states is the critic. Each
PPO step (numbered below as in the code):
  (1) sample a response per prompt          ppo_rollout.sample_responses (KV cache, left-padded prompts)
  (2) score it                              reward model at the last real token, normalized; clip; no-EOS penalty
  (3) reference and old log-probs + values  two no-grad passes (adapter off / on)
  (4) per-token KL penalty + final reward   losses.kl_penalty, per_token_rewards, adaptive KL coefficient
  (5) GAE advantages, whitened              losses.gae_advantages, masked_whiten
  (6) clipped policy + value loss           ppo_update: minibatches x ppo_epochs, approx-KL early stop
The math lives in losses.py, the sampling and scoring in ppo_rollout.py, the shared forward in value_head.py.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from rlhf_pipeline.cli import stage_command
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.training.options import TrainingOptions


class PPOConfig(TrainingOptions):
    reward_model: str | None = Field(None, description="The reward stage's output dir (merged/, adapter/, metrics.json).")
    steps: int = Field(20, gt=0, description="Number of PPO steps (each: sample, score, update).")
    batch_size: int = Field(8, gt=0, description="Prompts (= sampled responses) per PPO step.")
    mini_batch_size: int = Field(8, gt=0, description="Responses per PPO optimizer step.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each step's rollouts.")
    learning_rate: float = Field(1.41e-5, gt=0, description="AdamW learning rate (StackLLaMA: 1.41e-5).")
    lr_scheduler: str = Field("constant", description="transformers scheduler name (PPO: constant).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of optimizer steps with linear warm-up.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout; 0 so old and new log-probs agree.")
    save_steps: int = Field(10, gt=0, description="Checkpoint every N PPO steps (and at the end).")
    max_prompt_length: int = Field(256, gt=8, description="Prompt tokens kept (the question is cut, never the template tail).")
    min_new_tokens: int = Field(32, gt=0, description="Response length is sampled per step in [min, max] new tokens.")
    max_new_tokens: int = Field(128, gt=0, description="Upper end of the sampled response length.")
    force_length: bool = Field(False, description="Suppress EOS until the sampled length (fixed-length responses).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (also applied to the log-probs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    generation_backend: Literal["cache-loop", "hf"] = Field(
        "cache-loop", description="cache-loop: our KV-cache decode loop (sampling.py, faster); hf: model.generate.")
    reward_clip: float | None = Field(None, gt=0, description="Clip normalized rewards to [-c, c].")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from responses without EOS.")
    max_reward_length: int = Field(1024, gt=0, description="Token limit of the reward model's input.")
    kl_estimator: Literal["k1", "k3", "abs"] = Field("k1", description="Per-token KL estimator for the penalty.")
    init_kl_coef: float = Field(0.2, ge=0, description="Initial KL penalty coefficient (beta).")
    adaptive_kl: bool = Field(True, description="Adapt beta toward --target-kl (Ziegler et al.); else constant.")
    target_kl: float = Field(6.0, gt=0, description="Target KL per response (summed over tokens).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon (samples).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="PPO ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient.")
    early_stop_kl: float | None = Field(None, gt=0, description="Stop the step's epochs when approx-KL exceeds this.")
    value_head_init: Literal["zero", "reward"] = Field(
        "zero", description="Value head start: zeros, or the reward model's score head when the shapes match.")
    share_reward_base: bool = Field(
        True, description="Load the reward model as a frozen second adapter on the policy's base when its "
        "adapter was trained on the same SFT model (one copy of the weights); else load it separately.")
    log_generations_every: int = Field(10, gt=0, description="Log a table of sample generations every N steps.")

    @model_validator(mode="after")
    def _check(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) > batch_size ({self.batch_size})")
        if self.gradient_accumulation_steps != 1:
            raise ValueError("PPO takes one optimizer step per minibatch: set --mini-batch-size instead")
        return self


def read_rl_questions(data_dir: str, max_rows: int | None, seed: int) -> list[str]:
    """One question per qid from `<data>/rl.parquet` (it has one row per preference pair)."""
    from rlhf_pipeline.training.data import limit, read_subset

    seen, questions = set(), []
    for row in read_subset(data_dir, "rl"):
        if row["qid"] not in seen:
            seen.add(row["qid"])
            questions.append(row["question"])
    return limit(questions, max_rows, seed)


def prompt_indices(step: int, batch_size: int, num_prompts: int, seed: int) -> list[int]:
    """The prompts of PPO step `step`: a function of (seed, step) only, so a resumed run replays them."""
    from rlhf_pipeline.training.loop import epoch_order

    first = step * batch_size
    return [epoch_order(num_prompts, seed, i // num_prompts)[i % num_prompts] for i in range(first, first + batch_size)]


def run_ppo(cfg: PPOConfig, reward_fn=None) -> dict:
    """Train the policy; `reward_fn(questions, responses, rollout) -> scores` replaces the reward model (tests)."""
    import torch
    from tqdm.auto import tqdm

    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
    from rlhf_pipeline.training import ppo_rollout as rollouts
    from rlhf_pipeline.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from rlhf_pipeline.training.loop import build_accelerator, build_optimizer, build_scheduler, finished_run, \
        save_final, set_seed, tracked_run, write_metrics
    from rlhf_pipeline.training.losses import AdaptiveKLController, FixedKLController, gae_advantages, kl_penalty, \
        masked_mean, masked_whiten, per_token_rewards
    from rlhf_pipeline.training.value_head import PolicyWithValue, disable_dropout

    if reward_fn is None and cfg.reward_model is None:
        raise UserError("--reward-model is required (the reward stage's output directory)")
    if reward_fn is None:
        rollouts.read_reward_model_dir(cfg.reward_model)  # a bad path fails before anything is loaded or logged
    done = finished_run(cfg.output)
    if done is not None:
        return done
    questions = read_rl_questions(cfg.data, cfg.max_train_samples, cfg.seed)
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
        reward = rollouts.FunctionReward(reward_fn) if reward_fn is not None else model.attach_reward_model(cfg)
        optimizer = build_optimizer(model.parameters(), cfg)
        minibatches_per_step = -(-cfg.batch_size // cfg.mini_batch_size)
        scheduler = build_scheduler(optimizer, cfg, cfg.steps * cfg.ppo_epochs * minibatches_per_step)
        kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                  else FixedKLController(cfg.init_kl_coef))
        prompt_ids = rollouts.encode_prompts(tokenizer, cfg.prompt_template, questions, cfg.max_prompt_length)

        start, history, skipped = 0, [], 0
        checkpoint = latest_checkpoint(cfg.output)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model, optimizer, scheduler)
            start, history = state["step"], state["extra"]["history"]
            skipped = state["extra"]["skipped_updates"]
            kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
            tqdm.write(f"resuming from {checkpoint} (step {start})")

        eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="ppo", unit="step"):
            began = time.perf_counter()
            batch_idx = prompt_indices(step, cfg.batch_size, len(questions), cfg.seed)
            batch_questions = [questions[i] for i in batch_idx]
            timings = {}

            # (1) Sample responses; the length is drawn per step (StackLLaMA's length sampler), from (seed, step).
            max_new = random.Random(cfg.seed * 1_000_003 + step).randint(cfg.min_new_tokens, cfg.max_new_tokens)
            model.eval()
            with accelerator.autocast():
                rollout = rollouts.sample_responses(
                    model.policy, [prompt_ids[i] for i in batch_idx], max_new_tokens=max_new, eos_token_id=eos_id,
                    pad_token_id=pad_id, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    force_length=cfg.force_length, backend=cfg.generation_backend)
            responses = rollouts.decode_responses(tokenizer, rollout)
            mask = rollout.response_mask.float()  # [B, R]
            timings["generate"] = time.perf_counter() - began

            # (2) Score: reward model at the last real token (normalized), optional clip and no-EOS penalty.
            tic = time.perf_counter()
            with accelerator.autocast():
                if isinstance(reward, rollouts.RewardModelScorer):  # keep the raw score too, for the logs
                    raw_scores = reward.raw_scores(batch_questions, responses).float()
                    normalized = reward.normalize(raw_scores)
                else:
                    raw_scores = normalized = reward(batch_questions, responses, rollout).float().cpu()
            scores = rollouts.shape_scores(normalized, rollout.has_eos, reward_clip=cfg.reward_clip,
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
        adapter_dir, merged_dir = save_final(model.policy, tokenizer, cfg.output)
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
    import torch

    from rlhf_pipeline.training.losses import explained_variance, ppo_policy_loss, ppo_value_loss
    from rlhf_pipeline.training.value_head import ResponseOutputs

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


command = stage_command("ppo", PPOConfig, run_ppo, help=__doc__.split("\n\n")[0].removeprefix("`rlhf ppo`: "))
