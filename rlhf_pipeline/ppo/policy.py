"""Policy, reference and critic (and the reward model, when it can share) around ONE copy of the SFT weights."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf_pipeline.modeling.forward import ResponseOutputs, response_forward
from rlhf_pipeline.modeling.value_head import ValueHead
from rlhf_pipeline.training.trainable import trainable_model

def disable_dropout(module: nn.Module) -> None:
    """PPO needs pi_old == pi_theta before the first update (ratio 1): no dropout anywhere."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0


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
    def build(cls, base_model, cfg) -> "PolicyWithValue":
        policy = trainable_model(base_model, cfg, "CAUSAL_LM")
        head = ValueHead(base_model.config.hidden_size, dtype=torch.float32)  # fp32 even on a bf16/4-bit base
        head.to(next(base_model.parameters()).device)
        return cls(policy, head, temperature=getattr(cfg, "temperature", 1.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, *,
                with_values: bool = False, with_entropy: bool = False) -> ResponseOutputs:
        return response_forward(self.policy, input_ids, attention_mask, response_start,
                                value_head=self.value_head if with_values else None,
                                temperature=self.temperature, with_entropy=with_entropy)

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
            scorer = RewardModelScorer.load(cfg.reward_model, template=cfg.prompt_template, precision=cfg.precision,
                                            quantization=cfg.quantization, trust_remote_code=cfg.trust_remote_code,
                                            device=str(next(self.policy.parameters()).device),
                                            max_length=cfg.max_reward_length)

        shared = isinstance(scorer, SharedBaseRewardModel)
        tqdm.write(f"reward model {info.merged_dir.parent if info.adapter_dir else info.merged_dir}: "
                   + ("second adapter on the policy's base" if shared else "loaded separately"))
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
