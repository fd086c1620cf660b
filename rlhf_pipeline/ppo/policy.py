"""Policy, reference and critic (and the reward model, when it can share) around ONE copy of the SFT weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_pipeline.modeling.forward import ResponseOutputs, response_forward
from rlhf_pipeline.modeling.generation import Rollout
from rlhf_pipeline.modeling.lora import save_adapter_and_merged
from rlhf_pipeline.modeling.value_head import ValueHead
from rlhf_pipeline.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_pipeline.training.trainable import trainable_model


def disable_dropout(module: nn.Module) -> None:
    """PPO needs pi_old == pi_theta before the first update (ratio 1): no dropout anywhere, also in train mode.

    Every nn.Dropout (LoRA's, and FastDropout, a subclass) gets p = 0; so does every float `*dropout` attribute,
    the form in which transformers modules keep the dropout they apply in train mode (LlamaAttention's
    `attention_dropout`, BART-style layers' `dropout`, ...).
    """
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        for name, value in list(vars(sub).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(sub, name, 0.0)


def _row_chunks(rollout: Rollout, chunk: int | None) -> list[Rollout]:
    rows = rollout.input_ids.shape[0]
    if chunk is None or chunk >= rows:
        return [rollout]
    return [rollout.rows(slice(first, first + chunk)) for first in range(0, rows, chunk)]


class PolicyWithValue(nn.Module):
    """The policy (SFT weights + trainable LoRA adapter 'default'), its value head, and optionally the reward model.

    Reference model = `with self.policy.disable_adapter():` (the same frozen weights, no second copy). A checkpoint
    of this module holds exactly what trains: the LoRA weights and the value head.
    """

    def __init__(self, policy, value_head: ValueHead, temperature: float = 1.0):
        super().__init__()
        self.policy, self.value_head, self.temperature = policy, value_head, temperature
        self.reward_scorer = None  # not a submodule: never checkpointed, never optimized

    @classmethod
    def build(cls, base_model, cfg) -> PolicyWithValue:
        policy = trainable_model(base_model, cfg, "CAUSAL_LM")
        head = ValueHead(  # fp32 even on a bf16/4-bit base
            base_model.config.hidden_size,
            dtype=torch.float32,
            trains_backbone=getattr(cfg, "critic_trains_policy", True),
        )
        head.to(next(base_model.parameters()).device)
        return cls(policy, head, temperature=getattr(cfg, "temperature", 1.0))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int,
        *,
        with_values: bool = False,
        with_entropy: bool = False,
    ) -> ResponseOutputs:
        return response_forward(
            self.policy,
            input_ids,
            attention_mask,
            response_start,
            value_head=self.value_head if with_values else None,
            temperature=self.temperature,
            with_entropy=with_entropy,
        )

    # -- step (3): the reference and the old policy on a rollout ---------------------------------------------

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, chunk: int | None = None) -> torch.Tensor:
        """The frozen SFT model's log-probs of the responses [B, R]: the same weights with the adapter disabled,
        `chunk` rows per forward (all at once when None)."""
        with self.policy.disable_adapter():
            return torch.cat(
                [
                    self(part.input_ids, part.attention_mask, part.response_start).logprobs
                    for part in _row_chunks(rollout, chunk)
                ]
            )

    def old_outputs(
        self, rollout: Rollout, *, keep_graph: bool, forward: nn.Module | None = None, chunk: int | None = None
    ) -> ResponseOutputs:
        """pi_old's log-probs, values and entropy of the responses. `keep_graph`: run it with its graph (and in train
        mode, which only matters for gradient checkpointing), so that `ppo_update` can use it as the first
        minibatch's forward when that minibatch is the whole batch (same weights, no dropout: pi_old = pi_theta).
        `forward`: the module to run, this one wrapped for several processes (DDP: its gradients are all-reduced).
        `chunk`: rows per forward without a graph (a kept graph needs the whole batch in one pass)."""
        self.train(keep_graph)
        run = forward if forward is not None else self
        with torch.set_grad_enabled(keep_graph):
            parts = [
                run(part.input_ids, part.attention_mask, part.response_start, with_values=True, with_entropy=True)
                for part in _row_chunks(rollout, None if keep_graph else chunk)
            ]
        if len(parts) == 1:
            return parts[0]
        return ResponseOutputs(
            logprobs=torch.cat([p.logprobs for p in parts]),
            values=torch.cat([p.values for p in parts]),
            entropy=torch.cat([p.entropy for p in parts]),
        )

    def save_trained(self, output: str | Path, tokenizer) -> tuple[Path, Path]:
        """The trained policy: value head in `output`, adapter/ (with the value head) and merged/; a shared reward
        adapter is removed first, so only the policy's adapter is written and merged. Returns (adapter, merged)."""
        self.detach_reward_model()
        self.value_head.save(Path(output))
        adapter_dir, merged_dir = save_adapter_and_merged(self.policy, tokenizer, output)
        self.value_head.save(adapter_dir)
        return adapter_dir, merged_dir

    # -- reward model ---------------------------------------------------------------------------------------

    def attach_reward_model(self, cfg):
        """The reward source for PPO: a frozen second adapter on the shared base when possible, else a separate
        model. Also initializes the value head from the score head when asked (`value_head_init=reward`)."""
        from rlhf_pipeline.ppo.rewards import RewardModelScorer, SharedBaseRewardModel, read_reward_model_dir

        info = read_reward_model_dir(cfg.reward_model)
        scorer = None
        if cfg.share_reward_base:
            scorer = SharedBaseRewardModel.try_attach(self.policy, info, cfg)
        if scorer is None:
            scorer = RewardModelScorer.load(
                cfg.reward_model,
                template=cfg.prompt_template,
                precision=cfg.precision,
                quantization=cfg.quantization,
                trust_remote_code=cfg.trust_remote_code,
                device=str(next(self.policy.parameters()).device),
                max_length=cfg.max_reward_length,
            )

        shared = isinstance(scorer, SharedBaseRewardModel)
        tqdm.write(
            f"reward model {info.merged_dir.parent if info.adapter_dir else info.merged_dir}: "
            + ("second adapter on the policy's base" if shared else "loaded separately")
        )
        self.reward_scorer = scorer
        if cfg.value_head_init == "reward":
            head = scorer.score_head()
            if not self.value_head.init_from_score_head(head.weight, getattr(head, "bias", None)):
                tqdm.write("value head: reward score head shape differs, starting from zeros")
        return scorer

    def detach_reward_model(self) -> None:
        """Remove a shared reward adapter before saving, so only the policy's adapter is written and merged."""
        if self.reward_scorer is not None and hasattr(self.reward_scorer, "detach"):
            self.reward_scorer.detach()
        self.reward_scorer = None


# -- PPO's checkpoints: the trainable weights, optimizer, scheduler, RNG (training.checkpoint) + PPO's own state ----


def save_ppo_state(
    output: str | Path,
    step: int,
    model: PolicyWithValue,
    optimizer,
    scheduler,
    kl_ctl,
    history: list[dict],
    skipped_updates: int,
    keep: int = 2,
) -> None:
    """Checkpoint after `step` PPO steps, with the metrics history, skipped-update count and KL controller."""
    save_checkpoint(
        output,
        step,
        model,
        optimizer,
        scheduler,
        extra={"history": history, "skipped_updates": skipped_updates, "kl_ctl": kl_ctl.state_dict()},
        keep=keep,
    )


def restore_ppo_state(
    output: str | Path, model: PolicyWithValue, optimizer, scheduler, kl_ctl
) -> tuple[int, list[dict], int]:
    """Resume from the latest checkpoint in `output`, if any: (steps done, metrics history, skipped updates)."""
    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        return 0, [], 0
    state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
    tqdm.write(f"resuming from {checkpoint} (step {state['step']})")
    return state["step"], state["extra"]["history"], state["extra"]["skipped_updates"]
