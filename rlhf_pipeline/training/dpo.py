"""`rlhf dpo`: offline preference optimization (DPO or IPO) on the reward pairs, the SFT model as reference.

    rlhf dpo --model runs/sft/merged --data runs/data --output runs/dpo --loss dpo --beta 0.1 --max-steps 100

Per pair: chosen = response_j (the better-voted answer), rejected = response_k, prompt = the template's question.
Each step runs ONE policy forward over chosen and rejected rows concatenated ([chosen_1..B, rejected_1..B]) and,
for the reference, one no-grad forward of the same rows with the LoRA adapter disabled (same weights, no second
copy) -- or reads reference log-probs precomputed once before training (`--precompute-ref`). Only the positions
that predict response tokens go through the LM head. DPO uses summed response log-probs, IPO length-averaged
ones (see losses.ipo_loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhf_pipeline.batching.padding import collate_pairs
from rlhf_pipeline.batching.shared_prefix import is_shared_prefix_batch
from rlhf_pipeline.batching.tokenize import tokenize_preference_pairs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import shared_prefix_response_logprobs
from rlhf_pipeline.modeling.unpadded_attention import enable_shared_prefix
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training.losses import dpo_loss, ipo_loss
from rlhf_pipeline.training.options import LoopOptions
from rlhf_pipeline.training.pair_eval import gather_over_pairs
from rlhf_pipeline.training.preflight import check_model


class DPOConfig(LoopOptions):
    loss: Literal["dpo", "ipo"] = Field("dpo", description="dpo (Rafailov et al.) or ipo (Azar et al.).")
    beta: float = Field(0.1, gt=0, description="DPO beta / IPO tau: strength of the KL regularization.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    max_length: int = Field(512, gt=8, description="Pairs with a side longer than this (tokens) are dropped.")
    precompute_ref: bool = Field(
        False,
        description="Compute reference log-probs once before training "
        "(faster with several epochs) instead of in every step.",
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of questions held out for evaluation.")
    shared_prefix: bool = Field(
        True,
        description="Run chosen and rejected in one row that computes their common prefix (the prompt) once "
        "(see shared_prefix.py); off, or with an attention implementation other than sdpa/eager: two rows.",
    )


def collate_dpo_pairs(pairs, pad_id: int, shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """A pair batch (batching.padding.collate_pairs) with the response starts, plus the precomputed reference
    log-probs when the pairs carry them. Either way response_logps returns [chosen..., rejected...]."""
    batch = collate_pairs([(p[0], p[2]) for p in pairs], pad_id, shared_prefix, [(p[1], p[3]) for p in pairs])
    if len(pairs[0]) > 4:  # precomputed reference log-probs per side
        batch["ref_logps"] = torch.tensor([p[4] for p in pairs] + [p[5] for p in pairs], dtype=torch.float32)
    return batch


def response_logps(model, batch, average: bool) -> torch.Tensor:
    """Summed (DPO) or length-averaged (IPO) response log-probs per row [2B]."""
    from rlhf_pipeline.modeling.forward import packed_response_logprobs

    if is_shared_prefix_batch(batch):
        summed, counts = shared_prefix_response_logprobs(model, batch)
    else:
        summed, counts = packed_response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["label_mask"]
        )
    return summed / counts.clamp(min=1) if average else summed


def preference_terms(policy, batch, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [B], chosen rewards [B], rejected rewards [B]) of one pair batch; the reference is the policy with
    its adapter disabled (or the batch's precomputed reference log-probs)."""
    average = cfg.loss == "ipo"
    policy_logps = response_logps(policy, batch, average)  # [2B]
    if "ref_logps" in batch:
        ref_logps = batch["ref_logps"].to(policy_logps.device)
    else:
        with torch.no_grad(), policy.disable_adapter():
            ref_logps = response_logps(policy, batch, average)
    n = policy_logps.shape[0] // 2
    loss_fn = ipo_loss if cfg.loss == "ipo" else dpo_loss
    return loss_fn(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], cfg.beta)


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    return {
        "reward_accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "margin": float((chosen_rewards - rejected_rewards).mean()),
        "chosen_reward": float(chosen_rewards.mean()),
        "rejected_reward": float(rejected_rewards.mean()),
    }


class PreferenceLoss(torch.nn.Module):
    """forward(batch) -> (losses [B], chosen rewards [B], rejected rewards [B]): `preference_terms` as a module, so
    that accelerate/DDP can wrap it and all-reduce the policy's gradients over processes (the gradient sync hooks
    into the forward of the module it wraps). The reference pass (adapter disabled, no grad) runs inside it too."""

    def __init__(self, policy: torch.nn.Module, cfg: DPOConfig):
        super().__init__()
        self.policy = policy  # the PeftModel (saved and merged by the stage)
        self.cfg = cfg

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return preference_terms(self.policy, batch, self.cfg)


def preference_loss(policy, batch, cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO/IPO loss of one batch and its metrics."""
    losses, chosen_rewards, rejected_rewards = preference_terms(policy, batch, cfg)
    return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)


@torch.no_grad()
def precompute_reference(
    policy, pairs, cfg: DPOConfig, pad_id: int, device, shared_prefix: bool = False
) -> list[tuple]:
    """Reference log-probs of every pair, once (adapter disabled), appended to each pair tuple."""
    from tqdm.auto import tqdm

    out = []
    with policy.disable_adapter():
        for i in tqdm(range(0, len(pairs), cfg.batch_size), desc="reference log-probs", unit="batch"):
            chunk = pairs[i : i + cfg.batch_size]
            batch = {k: v.to(device) for k, v in collate_dpo_pairs(chunk, pad_id, shared_prefix).items()}
            logps = response_logps(policy, batch, cfg.loss == "ipo").float().cpu().tolist()
            n = len(chunk)
            out.extend((*p, logps[j], logps[n + j]) for j, p in enumerate(chunk))
    return out


@torch.no_grad()
def evaluate_pairs(accelerator, policy, pairs, cfg: DPOConfig, pad_id: int, shared_prefix: bool = False) -> dict:
    """Held-out loss, reward accuracy, margin and implicit rewards (means over every pair, all processes)."""

    def forward(batch):
        losses, chosen, rejected = preference_terms(policy, batch, cfg)
        return {"loss": losses, "chosen": chosen, "rejected": rejected}

    out = gather_over_pairs(
        accelerator,
        policy,
        forward,
        pairs,
        batch_size=cfg.batch_size,
        collate_fn=lambda b: collate_dpo_pairs(b, pad_id, shared_prefix),
    )
    metrics = {"loss": float(out["loss"].mean()), **preference_metrics(out["chosen"], out["rejected"])}
    return {f"dpo/eval_{k}": v for k, v in metrics.items()}


def run_dpo(cfg: DPOConfig, *, on_step=None) -> StageResult:
    """Train (or resume, or report a finished run); `on_step(step)` is called after every optimizer step."""
    from rlhf_pipeline.data.subsets import limit, read_subset, split_by_question
    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
    from rlhf_pipeline.modeling.lora import save_adapter_and_merged
    from rlhf_pipeline.training.loop import (
        build_accelerator,
        build_optimizer,
        build_scheduler,
        dump_trainable,
        finished_run,
        micro_batches,
        micro_batches_per_epoch,
        resume_if_possible,
        set_seed,
        total_optimizer_steps,
        tracked_run,
        train_loop,
    )
    from rlhf_pipeline.training.outputs import finish_stage
    from rlhf_pipeline.training.trainable import trainable_model

    done = finished_run(cfg.output, "dpo", cfg)
    if done is not None:
        return done
    check_model(cfg, task="CAUSAL_LM")  # before any work: one line, not a traceback inside transformers
    rows = read_subset(cfg.data, "reward")
    train_rows, eval_rows = split_by_question(rows, cfg.eval_fraction) if cfg.eval_fraction else (rows, [])
    train_rows = limit(train_rows, cfg.max_train_samples, cfg.seed)
    eval_rows = limit(eval_rows, cfg.max_eval_samples, cfg.seed)
    accelerator = build_accelerator(cfg)

    with tracked_run(cfg, "dpo", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:
        run.log_input(cfg.data, "reward", "training")
        set_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        train_pairs, dropped = tokenize_preference_pairs(tokenizer, train_rows, cfg.prompt_template, cfg.max_length)
        eval_pairs, _ = tokenize_preference_pairs(tokenizer, eval_rows, cfg.prompt_template, cfg.max_length)
        if not train_pairs:
            raise UserError(f"no preference pair fits --max-length {cfg.max_length} ({dropped} dropped)")
        base = load_causal_lm(
            cfg.model,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            device=str(accelerator.device),
        )
        shared = cfg.shared_prefix and enable_shared_prefix(base)
        policy = trainable_model(base, cfg, "CAUSAL_LM")
        pad_id = tokenizer.pad_token_id
        if cfg.precompute_ref:
            with accelerator.autocast():
                train_pairs = precompute_reference(policy, train_pairs, cfg, pad_id, accelerator.device, shared)
        module = PreferenceLoss(policy, cfg)
        optimizer = build_optimizer(module.parameters(), cfg)
        per_epoch = micro_batches_per_epoch(len(train_pairs), cfg.batch_size, accelerator.num_processes)
        total = total_optimizer_steps(cfg, per_epoch)
        scheduler = build_scheduler(optimizer, cfg, total)
        start = resume_if_possible(cfg.output, module, optimizer, scheduler)
        module, optimizer = accelerator.prepare(module, optimizer)
        batches = micro_batches(
            accelerator,
            train_pairs,
            batch_size=cfg.batch_size,
            collate_fn=lambda chunk: collate_dpo_pairs(chunk, pad_id, shared),
            seed=cfg.seed,
            start=start * cfg.gradient_accumulation_steps,
        )

        def loss_fn(prepared, batch):
            losses, chosen_rewards, rejected_rewards = prepared(batch)  # the PREPARED module: DDP syncs gradients
            sides = batch["last_index"].shape[0] if shared else batch["input_ids"].shape[0]  # 2 per pair
            return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards), sides / 2

        history: list[dict] = []

        def log_metrics(metrics, step):
            history.append({"step": step, **metrics})
            run.log_metrics(metrics, step=step)

        result = train_loop(
            accelerator,
            module,
            optimizer,
            scheduler,
            batches,
            loss_fn,
            cfg=cfg,
            total_steps=total,
            start_step=start,
            prefix="dpo",
            rate_name="pairs",
            log_metrics=log_metrics,
            on_step=on_step,
        )
        unwrapped = accelerator.unwrap_model(module).policy
        summary = {
            "loss_type": cfg.loss,
            "beta": cfg.beta,
            "steps": result.steps,
            "trained_steps": result.trained_steps,
            "num_pairs": len(train_pairs),
            "dropped_too_long": dropped,
            "dpo/pairs_per_s": result.items_per_s,
            **result.last_metrics,
        }
        if history:
            summary.update(
                first_step={k: v for k, v in history[0].items()},
                first_reward_accuracy=history[0].get("dpo/reward_accuracy"),
                first_margin=history[0].get("dpo/margin"),
            )
        unwrapped.eval()
        if eval_pairs:
            with accelerator.autocast():
                eval_metrics = evaluate_pairs(accelerator, unwrapped, eval_pairs, cfg, pad_id, shared)
            run.log_metrics(eval_metrics, step=result.steps)
            summary.update(eval_metrics)
        dump_trainable(accelerator, unwrapped, "dpo")

        return finish_stage(
            accelerator,
            run,
            "dpo",
            cfg.output,
            summary,
            lambda: save_adapter_and_merged(unwrapped, tokenizer, cfg.output),
            tags={"algorithm": cfg.loss},
        )
