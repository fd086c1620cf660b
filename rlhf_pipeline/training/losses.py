"""All RL and preference-learning math, as small pure tensor functions (no models, no I/O).

Shapes: B = batch (sequences), T = response tokens (positions after the prompt), V = vocabulary.
Every per-token function takes a `mask` [B, T] (1 = a real response token, 0 = padding: left prompt padding is
never part of T, tokens after the first EOS are 0). Padding never contributes to a mean, a variance, an advantage
or a loss.

Names follow the papers and cleanrl's ppo.py:
  PPO           Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, ratio,
                pg_loss1/pg_loss2, clipfrac, approx_kl)
  GAE           Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  KL control    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (adaptive KL coefficient)
  KL estimators Schulman 2020, "Approximating KL Divergence" (k1, k3)
  DPO           Rafailov et al. 2023, "Direct Preference Optimization"
  IPO           Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3", "abs"]


# ------------------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where mask == 1 (over all of them, or along `dim`). Empty -> 0."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions (Bessel-corrected by default, like torch.var)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n > 1:
            variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over masked positions; padding is set to 0.

    shift_mean=False keeps the mean (scales only), as PPO implementations do for rewards.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy from logits
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# KL estimators (per token; policy p, reference q; samples drawn from p)
# ------------------------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q. Unbiased for KL(p||q) but negative on some tokens (high variance)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q/p. Unbiased, lower variance, and never negative (since e^x >= 1 + x)."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """|log p - log q|: a non-negative penalty (biased as a KL estimate)."""
    return (logprobs - ref_logprobs).abs()


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3, "abs": kl_abs}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL estimate [B, T] with the named estimator."""
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


# ------------------------------------------------------------------------------------------------------------
# Rewards and advantages
# ------------------------------------------------------------------------------------------------------------


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's baseline (Ahmadian et al., 2024): each response's score minus the mean score of the OTHER responses
    to the same prompt. scores [B] in consecutive groups of `group_size` (B = prompts x group_size) -> [B].

    s_i - (sum_g - s_i) / (k - 1) = (k * s_i - sum_g) / (k - 1): what differs between questions (some questions
    score higher whatever is answered) cancels, what an answer does better than its siblings stays.
    """
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores are not groups of {group_size} >= 2 responses per prompt")
    groups = scores.reshape(-1, group_size)
    return ((group_size * groups - groups.sum(-1, keepdim=True)) / (group_size - 1)).reshape(-1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Ziegler et al.'s reward: -kl_coef * KL on every response token, plus the sequence score on the last real one.

    scores [B], kl [B, T], mask [B, T] (contiguous from position 0) -> rewards [B, T], 0 on padding.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last_real = (mask.sum(1).long() - 1).clamp(min=0)  # [B]: index of the last real response token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last_real] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens. rewards, values, mask [B, T] -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends at the last real token: V and A beyond it count as 0, and padding gets advantage 0.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    advantages_reversed = []
    last_gae_lam = torch.zeros_like(rewards[:, 0])  # [B]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])  # 0 past the end (masked)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae_lam = (delta + gamma * lam * last_gae_lam) * mask[:, t]
        advantages_reversed.append(last_gae_lam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    returns = advantages + values
    return advantages, returns


# ------------------------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate. All [B, T] -> (pg_loss, clipfrac, approx_kl), scalars over masked tokens.

    approx_kl is the k3 estimate of KL(old || new) on the sampled tokens (cleanrl's; used for early stopping).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return pg_loss, clipfrac, approx_kl


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2). All [B, T] -> (v_loss, vf_clipfrac)."""
    v_loss_unclipped = (values - returns) ** 2
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    v_loss_clipped = (v_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask)
    return v_loss, vf_clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 = perfect critic, <= 0 = useless.

    NaN when the returns have no variance (nothing to explain).
    """
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask) / var_returns


# ------------------------------------------------------------------------------------------------------------
# Offline preference losses (one value per pair: inputs [B] -> losses [B])
# ------------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., eq. 7): -log sigmoid(beta * (pi_logratios - ref_logratios)).

    Inputs are SUMMED response log-probs per sequence [B]. Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]) with the implicit rewards beta * (log pi - log pi_ref).
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al., eq. 17): (h - 1/(2*tau))^2, h = log [pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))], tau = beta.

    The regression target 1/(2*tau) is a fixed log-ratio gap, so the scale of the log-probs matters: the DPO
    stage passes LENGTH-AVERAGED response log-probs for IPO (mean per token, as TRL does), which keeps the
    target independent of answer length. Returns (losses, chosen_rewards, rejected_rewards) like dpo_loss.
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# ------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, section 2.2)
# ------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2), K_beta = n_steps / horizon.

    Raises the coefficient when the policy drifts past the target KL and lowers it when it stays below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
