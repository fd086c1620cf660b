"""The policy's learned value function, and the one forward pass that PPO, DPO and evaluation share.

The value head is a linear layer on the policy's last hidden states (shared backbone, as in Ziegler et al. and
StackLLaMA), so one forward gives both the token log-probs and the values. `response_forward` runs the decoder
once and applies the (large) LM head only to the positions that predict response tokens: with a 49k vocabulary
most of the logits work of a naive forward would go to the prompt, where nothing needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_pipeline.training.losses import entropy_from_logits, logprobs_from_logits

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the last hidden state. Zero-initialized: values start at 0, not at noise."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        return self.summary(hidden_states.to(self.summary.weight.dtype)).squeeze(-1)

    def init_from_score_head(self, score_weight: torch.Tensor, score_bias: torch.Tensor | None = None) -> bool:
        """Copy a reward model's score head ([1, H] weight) when shapes match; returns whether it did."""
        if tuple(score_weight.shape) != tuple(self.summary.weight.shape):
            return False
        with torch.no_grad():
            self.summary.weight.copy_(score_weight.to(self.summary.weight.dtype))
            self.summary.bias.copy_(score_bias.reshape(1) if score_bias is not None else torch.zeros(1))
        return True

    def save(self, directory: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(directory) / VALUE_HEAD_FILE))

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(load_file(str(Path(directory) / VALUE_HEAD_FILE)))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as `generate` computes them (so log-probs match sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_and_head(causal_lm) -> tuple[nn.Module, nn.Module]:
    """(decoder stack, LM head) of a causal LM, also through a PeftModel (LoRA layers live inside the decoder)."""
    model = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return model.base_model, model.get_output_embeddings()


@dataclass
class ResponseOutputs:
    logprobs: torch.Tensor  # [B, R] log pi(response token t | prefix)
    values: torch.Tensor | None  # [B, R] V(prefix before token t)
    entropy: torch.Tensor | None  # [B, R] entropy of pi(. | prefix) (no grad)


def response_forward(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int, *,
                     value_head: ValueHead | None = None, temperature: float = 1.0,
                     with_entropy: bool = False) -> ResponseOutputs:
    """One decoder pass over prompt + response; log-probs (and values) for the response tokens only.

    input_ids, attention_mask [B, P + R] with the response starting at column P = response_start (prompts left
    padded to a common length). The LM head runs on R positions, not P + R.
    """
    decoder, lm_head = decoder_and_head(causal_lm)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    hidden = hidden[:, response_start - 1 : -1]  # [B, R, H]: the state at t-1 predicts response token t
    # The head on a 2-D [B*R, H] input: a (non-contiguous) 3-D slice makes torch run a batched matmul that
    # copies the whole [V, H] weight per call (~0.3 s per forward+backward for SmolLM2 in bf16 on a CPU).
    batch, length, width = hidden.shape
    logits = lm_head(hidden.reshape(batch * length, width)).float().view(batch, length, -1)  # [B, R, V]
    if temperature != 1.0:
        logits = logits / temperature
    response_ids = input_ids[:, response_start:]  # [B, R]
    logprobs = logprobs_from_logits(logits, response_ids)
    values = value_head(hidden) if value_head is not None else None
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    return ResponseOutputs(logprobs=logprobs, values=values, entropy=entropy)


def sequence_logprobs(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, length-averaged) response log-probs per sequence [B] (DPO/IPO and evaluation KL)."""
    logprobs = response_forward(causal_lm, input_ids, attention_mask, response_start).logprobs
    mask = response_mask.to(logprobs.dtype)
    summed = (logprobs * mask).sum(-1)
    return summed, summed / mask.sum(-1).clamp(min=1.0)


# ------------------------------------------------------------------------------------------------------------
# Policy + reference + critic (+ reward model) around ONE copy of the SFT weights
# ------------------------------------------------------------------------------------------------------------


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
        from rlhf_pipeline.training.lora import apply_lora

        policy = apply_lora(base_model, cfg, "CAUSAL_LM")
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
        from rlhf_pipeline.training.ppo_rollout import RewardModelScorer, SharedBaseRewardModel, read_reward_model_dir

        info = read_reward_model_dir(cfg.reward_model)
        scorer = None
        if cfg.share_reward_base:
            scorer = SharedBaseRewardModel.try_attach(self.policy, info, cfg)
        if scorer is None:
            scorer = RewardModelScorer.load(cfg.reward_model, template=cfg.prompt_template, precision=cfg.precision,
                                            quantization=cfg.quantization, trust_remote_code=cfg.trust_remote_code,
                                            device=str(next(self.policy.parameters()).device),
                                            max_length=cfg.max_reward_length)
        from tqdm.auto import tqdm

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


def packed_response_logprobs(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and token-count of response log-probs per row for RIGHT-padded rows with different prompt lengths.

    label_mask [B, L] marks the response tokens (the labels). Only the hidden states that predict them go through
    the LM head ([N, H] -> [N, V], N = response tokens in the batch), never the prompt or the padding.
    Returns (summed logps [B], response token counts [B]).
    """
    decoder, lm_head = decoder_and_head(causal_lm)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    predictor = torch.zeros_like(label_mask, dtype=torch.bool)
    predictor[:, :-1] = label_mask[:, 1:].bool()  # the state at t-1 predicts the token at t
    rows = predictor.nonzero(as_tuple=True)[0]  # [N]
    logits = lm_head(hidden[predictor]).float()  # [N, V]
    labels = input_ids[:, 1:][label_mask[:, 1:].bool()]  # [N], same row-major order as hidden[predictor]
    token_logps = logprobs_from_logits(logits, labels)  # [N]
    summed = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    summed = summed.index_add(0, rows, token_logps)
    counts = label_mask[:, 1:].sum(-1).to(summed.dtype)
    return summed, counts
