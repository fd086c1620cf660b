"""`rlhf ppo`: PPO against the reward model with a per-token KL penalty to the SFT model (StackLLaMA step 3).

    rlhf ppo --model runs/sft/merged --reward-model runs/reward --data runs/data --output runs/ppo \\
        --steps 20 --batch-size 8 --mini-batch-size 8 --ppo-epochs 4 --min-new-tokens 32 --max-new-tokens 48

One model in memory: the SFT weights with a trainable LoRA adapter are the policy; the same weights with the
adapter disabled are the frozen reference; a value head on the policy's last hidden states is the critic. The
algorithm reads top to bottom in this file; each PPO step (numbered as in the code) calls one role module:
  (1) sample a response per prompt          rollout.sample_rollout (KV cache, left-padded; length per step)
  (2) score it                              rewards.score_responses (normalized reward; clip; no-EOS penalty);
                                            optionally minus the prompt's other answers' mean (leave-one-out)
  (3) reference and old log-probs + values  policy: reference_logprobs (adapter off), old_outputs (adapter on)
  (4) per-token KL penalty + final reward   losses.kl_penalty, per_token_rewards; adaptive KL coefficient
  (5) GAE advantages, whitened              losses.gae_advantages, masked_whiten
  (6) clipped policy + value loss           ppo_update below: minibatches x ppo_epochs, approx-KL early stop
By role: config.py (options), rollout.py (which prompts, how long, the samples), policy.py (policy + reference +
critic on one base, PPO's checkpoints), rewards.py (reward sources), distributed.py (one job over several
processes), metrics.py (what is logged); the math is training/losses.py, every forward modeling/forward.py. The
result is a `results.StageResult`, also written as <output>/metrics.json.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from tqdm.auto import tqdm

from rlhf_pipeline.batching.tokenize import encode_prompts
from rlhf_pipeline.data.subsets import read_questions
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import ResponseOutputs
from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.distributed import (
    all_finite,
    gather_rows,
    gather_strings,
    mean_scalars_over_processes,
    sum_over_processes,
    whiten_over_processes,
)
from rlhf_pipeline.ppo.metrics import Gathered, Stopwatch, step_metrics, summarize
from rlhf_pipeline.ppo.policy import PolicyWithValue, disable_dropout, restore_ppo_state, save_ppo_state
from rlhf_pipeline.ppo.rewards import FunctionReward, read_reward_model_dir, score_responses
from rlhf_pipeline.ppo.rollout import log_generations, process_rng, sample_rollout, step_prompts
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training.loop import (
    PreemptionGuard,
    any_process,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    dump_trainable,
    finished_run,
    on_main_then_wait,
    set_seed,
    stop_if_asked,
    tracked_run,
)
from rlhf_pipeline.training.losses import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae_advantages,
    kl_penalty,
    leave_one_out_baseline,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_pipeline.training.outputs import finish_stage
from rlhf_pipeline.training.preflight import check_model


def run_ppo(cfg: PPOConfig, reward_fn=None, *, on_step=None) -> StageResult:
    """Train the policy; `reward_fn(questions, responses, rollout) -> scores` replaces the reward model (tests);
    `on_step(step)` is called after every PPO step (after its checkpoint), as in the other stages."""
    if reward_fn is None and cfg.reward_model is None:
        raise UserError("--reward-model is required (the reward stage's output directory)")
    if reward_fn is None:
        read_reward_model_dir(cfg.reward_model)  # a bad path fails before anything is loaded or logged
    done = finished_run(cfg.output, "ppo", cfg)
    if done is not None:
        return done
    check_model(cfg, task="CAUSAL_LM")  # before any work: one line, not a traceback inside transformers
    questions = read_questions(cfg.data, "rl", cfg.max_train_samples, cfg.seed)
    if len(questions) < cfg.batch_size:
        raise UserError(
            f"{cfg.data}/rl.parquet has {len(questions)} questions, fewer than --batch-size {cfg.batch_size}"
        )
    accelerator = build_accelerator(cfg)
    world = accelerator.num_processes
    if cfg.batch_size % world or cfg.mini_batch_size % world:
        raise UserError(
            f"--batch-size ({cfg.batch_size}) and --mini-batch-size ({cfg.mini_batch_size}) must be multiples of "
            f"the number of processes ({world}): each process samples and trains on an equal share"
        )
    if (cfg.batch_size // world) % cfg.samples_per_prompt:
        raise UserError(
            f"--batch-size ({cfg.batch_size}) / {world} processes is not a multiple of --samples-per-prompt "
            f"({cfg.samples_per_prompt}): a prompt's answers must all be sampled on one process"
        )
    # This process's share of every step's batch and minibatch (the whole of them with one process).
    local_cfg = (
        cfg
        if world == 1
        else cfg.model_copy(
            update={"batch_size": cfg.batch_size // world, "mini_batch_size": cfg.mini_batch_size // world}
        )
    )

    with (
        tracked_run(cfg, "ppo", accelerator, data_dir=cfg.data, base_model=cfg.model) as run,
        PreemptionGuard() as guard,
    ):
        run.log_input(cfg.data, "rl", "training")
        set_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model, padding_side="left", trust_remote_code=cfg.trust_remote_code)
        base = load_causal_lm(
            cfg.model,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            device=str(accelerator.device),
        )
        model = PolicyWithValue.build(base, cfg)  # LoRA policy + value head; reference = adapter disabled
        disable_dropout(model)  # pi_old == pi_theta before each step's first update
        reward = FunctionReward(reward_fn) if reward_fn is not None else model.attach_reward_model(cfg)
        optimizer = build_optimizer(model.parameters(), cfg)
        minibatches_per_step = -(-cfg.batch_size // cfg.mini_batch_size)
        scheduler = build_scheduler(optimizer, cfg, cfg.steps * cfg.ppo_epochs * minibatches_per_step)
        kl_ctl = (
            AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.init_kl_coef)
        )
        prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, questions, cfg.max_prompt_length)
        start, history, skipped = restore_ppo_state(cfg.output, model, optimizer, scheduler, kl_ctl)
        # Several processes: the update's forwards go through DDP, which all-reduces the policy's and the value
        # head's gradients (sampling, scoring and the reference pass use `model` itself: no gradients there).
        prepared = accelerator.prepare_model(model) if world > 1 else model

        for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="ppo", unit="step"):
            clock = Stopwatch()
            batch_questions, batch_prompts = step_prompts(
                step, questions, prompt_ids, cfg, accelerator.process_index, world
            )

            # (1) Sample samples_per_prompt responses per prompt, of a length drawn per step from (seed, step).
            with clock("generate"), accelerator.autocast(), process_rng(accelerator, cfg.seed, step):
                rollout, responses = sample_rollout(model, tokenizer, batch_prompts, step, cfg)
            mask = rollout.response_mask.float()  # [B, R]

            # (2) Score: the reward model at the last real token (normalized); optional clip and no-EOS penalty.
            with clock("score"), accelerator.autocast():
                raw_scores, scores = score_responses(reward, batch_questions, responses, rollout, cfg)
            # what the advantages see: the scores, or each minus its prompt's other answers' mean (RLOO's baseline)
            baselined = (
                leave_one_out_baseline(scores, cfg.samples_per_prompt)
                if cfg.reward_baseline == "leave_one_out"
                else scores
            )

            # (3) Reference log-probs (adapter disabled, no grad), old log-probs + values (adapter on), in chunks of
            # rollout_batch_size rows. With one minibatch per epoch and no chunking the old pass IS the first
            # update's forward: it keeps its graph for ppo_update.
            chunk = local_cfg.rollout_chunk()
            reuse_old_pass = cfg.mini_batch_size >= cfg.batch_size and chunk >= local_cfg.batch_size
            with clock("forward"), accelerator.autocast():
                ref_logprobs = model.reference_logprobs(rollout, chunk)
                old = model.old_outputs(rollout, keep_graph=reuse_old_pass, forward=prepared, chunk=chunk)
            old_logprobs, old_values = old.logprobs.detach(), old.values.detach().float()

            # (4) Per-token KL penalty; the score is added at the last real token.
            kl = kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # [B, R]
            rewards = per_token_rewards(baselined, kl, kl_ctl.value, mask)  # [B, R]

            # (5) GAE advantages, whitened over the real tokens of the whole (global) batch.
            advantages, returns = gae_advantages(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten_over_processes(accelerator, advantages, mask)

            # (6) Clipped policy and value losses over minibatches and epochs; then adapt the KL coefficient.
            with clock("update"):
                update = ppo_update(
                    prepared,
                    optimizer,
                    scheduler,
                    rollout,
                    old_logprobs,
                    old_values,
                    advantages,
                    returns,
                    local_cfg,
                    accelerator,
                    first_forward=old if reuse_old_pass else None,
                )
            skipped += update.pop("skipped_updates")
            # The adaptive KL controller sees the mean KL of the global batch (the same value on every process).
            if world == 1:
                sequence_kl = float(kl.sum(-1).mean())
            else:
                sequence_kl = sum_over_processes(accelerator, kl.sum(-1)) / cfg.batch_size
            kl_ctl.update(sequence_kl, cfg.batch_size)

            # The step's metrics over the global batch: every process computes the same numbers.
            seen = Gathered.of(accelerator, scores, raw_scores, old.entropy, mask, rollout.has_eos)
            metrics = step_metrics(
                seen.scores,
                seen.raw_scores,
                sequence_kl,
                kl_ctl.value,
                seen.entropy,
                seen.mask,
                seen.has_eos,
                update,
                skipped,
                clock,
                cfg,
            )
            history.append({k.removeprefix("ppo/"): v for k, v in metrics.items()})
            run.log_metrics(metrics, step=step + 1)
            if (step + 1) % cfg.log_generations_every == 0 or step == start:
                log_generations(
                    run,
                    step,
                    gather_strings(accelerator, batch_questions),
                    gather_strings(accelerator, responses),
                    seen.scores,
                    every=cfg.log_generations_every,
                    first=step == start,
                )
            preempted = any_process(accelerator, guard.requested)  # SIGTERM: checkpoint this step, then exit
            if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.steps or preempted:
                save = partial(
                    save_ppo_state,
                    cfg.output,
                    step + 1,
                    model,
                    optimizer,
                    scheduler,
                    kl_ctl,
                    history,
                    skipped,
                    keep=cfg.keep_checkpoints,
                )
                on_main_then_wait(accelerator, save)  # one writer; the others wait until the checkpoint is whole
            stop_if_asked(accelerator, step + 1)
            if on_step is not None:
                on_step(step + 1)
            if preempted:
                guard.stop("ppo", step + 1)

        summary = summarize(history, cfg)
        dump_trainable(accelerator, model, "ppo")

        return finish_stage(
            accelerator,
            run,
            "ppo",
            str(cfg.output),
            summary,
            lambda: model.save_trained(cfg.output, tokenizer),
            tags={"algorithm": "ppo"},
        )


# ppo_update's statistics that compare the updated policy/critic with the rollout's: 0 before the first step
RATIO_STATS = ("approx_kl", "clipfrac", "vf_clipfrac")


def ppo_update(
    model,
    optimizer,
    scheduler,
    rollout,
    old_logprobs,
    old_values,
    advantages,
    returns,
    cfg,
    accelerator,
    first_forward=None,
) -> dict:
    """Step (6): `ppo_epochs` passes of shuffled minibatches over one step's rollouts.

    `first_forward`: the old pass's outputs WITH their graph, used as the forward of the first minibatch when it
    covers the whole batch (the weights have not changed since, so recomputing it would give the same tensors).

    A minibatch whose loss or gradients are not finite is skipped (counted; the optimizer never sees it), so a
    NaN never reaches the weights. An epoch whose mean approx-KL passes `early_stop_kl` ends the update.

    approx_kl, clipfrac and vf_clipfrac are returned as means over the minibatches that ran after the update's
    first optimizer step only: before it the policy and critic ARE the rollout's (ratio 1, values unclipped), so
    those minibatches add exact zeros. With one epoch of one minibatch the keys are absent, not logged as 0.
    """
    mask = rollout.response_mask.float()
    world = accelerator.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    stat_names = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "vf_clipfrac")
    stats: dict[str, list[float]] = {k: [] for k in stat_names}
    skipped, epochs_done, optimizer_steps = 0, 0, 0
    model.train()  # dropout is off (disable_dropout); train() only enables gradient checkpointing when configured
    chunk = cfg.rollout_chunk() if hasattr(cfg, "rollout_chunk") else cfg.mini_batch_size
    for _ in range(cfg.ppo_epochs):
        epoch_kl = []
        for mb in torch.randperm(cfg.batch_size).split(cfg.mini_batch_size):
            # The minibatch in row chunks of `chunk` (rollout_batch_size), each backpropagated at once: a chunk's
            # masked means weighted by its share of the minibatch's tokens sum to the minibatch's means, so the
            # accumulated gradient is the one-pass gradient while only one chunk's activations are alive.
            tokens = mask[mb].sum().clamp(min=1.0)
            parts = mb.split(chunk)
            totals = torch.zeros(len(stat_names), device=mask.device)
            finite = True
            for index, rows in enumerate(parts):
                if first_forward is not None:
                    new = ResponseOutputs(
                        logprobs=first_forward.logprobs[rows], values=first_forward.values[rows], entropy=None
                    )
                    first_forward = None
                else:
                    with accelerator.autocast():
                        new = model(
                            rollout.input_ids[rows],
                            rollout.attention_mask[rows],
                            rollout.response_start,
                            with_values=True,
                        )
                pg_loss, clipfrac, approx_kl = ppo_policy_loss(
                    new.logprobs, old_logprobs[rows], advantages[rows], mask[rows], cfg.cliprange
                )
                v_loss, vf_clipfrac = ppo_value_loss(
                    new.values.float(), old_values[rows], returns[rows], mask[rows], cfg.cliprange_value
                )
                share = mask[rows].sum() / tokens if len(parts) > 1 else 1.0
                loss = (pg_loss + cfg.vf_coef * v_loss) * share
                # checked BEFORE backward: nothing non-finite is ever accumulated (on every process if on one: with
                # DDP all of them must run the backward, or none)
                if not (torch.isfinite(loss) if world == 1 else all_finite(accelerator, loss)):
                    finite = False
                    break
                last = index + 1 == len(parts)
                # with DDP the gradients are all-reduced in the last chunk's backward only
                with nullcontext() if world == 1 or last else accelerator.no_sync(model):
                    loss.backward()
                values = torch.stack([pg_loss, v_loss, approx_kl, clipfrac, vf_clipfrac]).detach().float()
                totals += values * share
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # the same on every process
            if not torch.isfinite(grad_norm):  # and the gradients before the step
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            values = tuple(totals)
            if world > 1:  # the minibatch's statistics over all processes (the early stop decides the same)
                values = mean_scalars_over_processes(accelerator, values)
            values = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in values]
            for key, value in zip(stat_names, values):
                if optimizer_steps > 0 or key not in RATIO_STATS:
                    stats[key].append(value)
            optimizer_steps += 1
            epoch_kl.append(values[stat_names.index("approx_kl")])
        epochs_done += 1
        if cfg.early_stop_kl is not None and epoch_kl and sum(epoch_kl) / len(epoch_kl) > cfg.early_stop_kl:
            break
    model.eval()
    # the losses are NaN when every minibatch was skipped; the ratio statistics are absent when none could be non-zero
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items() if v or k not in RATIO_STATS}
    if world > 1:  # the critic's explained variance over the global batch
        old_values, returns, mask = (gather_rows(accelerator, t) for t in (old_values, returns, mask))
    out.update(
        skipped_updates=skipped,
        epochs=float(epochs_done),
        explained_variance=float(explained_variance(old_values, returns, mask)),
    )
    return out
