"""losses.py against numbers worked out by hand (written out below), plus properties on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_pipeline.modeling.forward import entropy_from_logits, logprobs_from_logits
from rlhf_pipeline.training.losses import (
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    explained_variance,
    gae_advantages,
    ipo_loss,
    kl_abs,
    kl_k1,
    kl_k3,
    kl_penalty,
    leave_one_out_baseline,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

LN2 = math.log(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    assert torch.allclose(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol
    ), f"{actual} != {expected}"


# --- masked statistics ------------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_ignore_padding():
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    close(masked_mean(values, mask), 2.0)
    close(masked_var(values, mask), 1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    close(masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    close(masked_whiten(values, mask), t([-1.0, 0.0, 1.0, 0.0]))  # padding -> 0, not (100-2)/1
    close(masked_whiten(values, mask, shift_mean=False), t([1.0, 2.0, 3.0, 0.0]))
    close(masked_mean(t([1.0, 2.0], [3.0, 4.0]), t([1, 0], [1, 1]), dim=1), t(1.0, 3.5))


def test_masked_whiten_matches_torch_on_the_real_positions():
    torch.manual_seed(0)
    values = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    real = values[mask.bool()]
    expected = (real - real.mean()) / real.std()
    close(masked_whiten(values, mask)[mask.bool()], expected, tol=1e-6)


# --- log-probs, entropy ------------------------------------------------------------------------------------------


def test_logprobs_and_entropy_from_logits():
    logits = t([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    close(logprobs_from_logits(logits, torch.tensor([[1]])), t([math.log(0.75)]))
    close(entropy_from_logits(logits), t([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]))  # 0.562335
    close(entropy_from_logits(t([0.0, 0.0])), LN2)


# --- KL estimators -----------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    p, q = t(math.log(0.5), math.log(0.25)), t(math.log(0.25), math.log(0.5))  # policy, reference
    close(kl_k1(p, q), t(LN2, -LN2))
    # k3 = (r - 1) - log r, r = q/p: r = 0.5 -> -0.5 + ln 2; r = 2 -> 1 - ln 2
    close(kl_k3(p, q), t(-0.5 + LN2, 1.0 - LN2))
    close(kl_abs(p, q), t(LN2, LN2))
    close(kl_penalty(p, q, "k3"), kl_k3(p, q))


def test_k3_is_never_negative_on_random_tensors():
    torch.manual_seed(0)
    for scale in (0.01, 1.0, 10.0):
        logp, ref = torch.randn(64, 32) * scale, torch.randn(64, 32) * scale
        assert (kl_k3(logp, ref) >= 0).all()
        assert (kl_abs(logp, ref) >= 0).all()
    assert (kl_k1(torch.randn(1000), torch.randn(1000)) < 0).any()  # k1 is not: that is why k3 exists


def test_k1_and_k3_estimate_the_true_kl_from_samples():
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    torch.manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[tokens], q.log()[tokens]
    assert abs(float(kl_k1(logp, logq).mean()) - true_kl) < 0.01
    assert abs(float(kl_k3(logp, logq).mean()) - true_kl) < 0.01


# --- rewards, GAE ------------------------------------------------------------------------------------------------


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    rewards = per_token_rewards(t(2.0), t([0.1, 0.2, 0.3]), kl_coef=0.5, mask=t([1, 1, 0]))
    close(rewards, t([-0.05, -0.1 + 2.0, 0.0]))


def test_gae_by_hand():
    # gamma 1, lam 0.5, V = [0.5, 0.4, 0.3], r = [0, 0, 1]
    # delta2 = 1 - 0.3 = 0.7                       A2 = 0.7
    # delta1 = 0 + 0.3 - 0.4 = -0.1                A1 = -0.1 + 0.5 * 0.7 = 0.25
    # delta0 = 0 + 0.4 - 0.5 = -0.1                A0 = -0.1 + 0.5 * 0.25 = 0.025
    adv, ret = gae_advantages(t([0.0, 0.0, 1.0]), t([0.5, 0.4, 0.3]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    close(adv, t([0.025, 0.25, 0.7]))
    close(ret, t([0.525, 0.65, 1.0]))
    # gamma 0.9, lam 1, V = 0: A_t = discounted return = [0.81, 0.9, 1]
    adv, _ = gae_advantages(t([0.0, 0.0, 1.0]), t([0.0, 0.0, 0.0]), t([1, 1, 1]), gamma=0.9, lam=1.0)
    close(adv, t([0.81, 0.9, 1.0]))


def test_gae_ignores_padding():
    # the episode ends at position 1; garbage reward 5 and value 9 on the padding must change nothing
    # delta1 = 1 + 0 - 0.4 = 0.6 (no bootstrap past the end)   A1 = 0.6
    # delta0 = 0 + 0.4 - 0.5 = -0.1                            A0 = -0.1 + 0.5 * 0.6 = 0.2
    adv, ret = gae_advantages(t([0.0, 1.0, 5.0]), t([0.5, 0.4, 9.0]), t([1, 1, 0]), gamma=1.0, lam=0.5)
    close(adv, t([0.2, 0.6, 0.0]))
    close(ret, t([0.7, 1.0, 0.0]))


# --- PPO losses --------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_by_hand():
    ratio = t([1.5, 0.5, 1.1, math.exp(5.0)])
    old = t([-1.0, -2.0, -0.5, -3.0])
    new = old + ratio.log()
    adv = t([1.0, 1.0, -1.0, 100.0])
    mask = t([1, 1, 1, 0])  # the last token is padding with a huge ratio and advantage
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.1, 1.1) = 1.1
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    close(loss, (-1.2 - 0.5 + 1.1) / 3)
    close(clipfrac, 2 / 3)  # |ratio - 1| > 0.2 on tokens 0 and 1
    close(approx_kl, ((0.5 - math.log(1.5)) + (-0.5 + LN2) + (0.1 - math.log(1.1))) / 3)


def test_ppo_policy_loss_gradient_is_zero_when_clipped():
    old = t([0.0, 0.0])
    new = (old + t([math.log(1.5), math.log(1.1)])).requires_grad_(True)
    loss, _, _ = ppo_policy_loss(new, old, t([1.0, 1.0]), t([1, 1]), clip_range=0.2)
    loss.backward()
    close(new.grad, t([0.0, -1.1 / 2]))  # d(-A * ratio)/d logp = -A * ratio, averaged over 2 tokens


def test_ppo_value_loss_by_hand():
    # token 0: unclipped (1-1)^2 = 0, clipped V = 0 + 0.5 -> (0.5-1)^2 = 0.25 -> 0.25
    # token 1: unclipped (2-0)^2 = 4, clipped V = 2 -> 4 -> 4;  loss = 0.5 * (0.25 + 4) / 2
    loss, vf_clipfrac = ppo_value_loss(
        t([1.0, 2.0, 7.0]), t([0.0, 2.0, 0.0]), t([1.0, 0.0, -7.0]), t([1, 1, 0]), clip_range_value=0.5
    )
    close(loss, 1.0625)
    close(vf_clipfrac, 0.5)


def test_explained_variance():
    returns, mask = t([1.0, 2.0, 3.0, 50.0]), t([1, 1, 1, 0])
    close(explained_variance(t([1.0, 2.0, 3.0, 0.0]), returns, mask), 1.0)
    close(explained_variance(t([0.0, 0.0, 0.0, 0.0]), returns, mask), 0.0)
    # residual [0, 0, -1]: var = 1/3; var(returns) = 1
    close(explained_variance(t([1.0, 2.0, 4.0, 0.0]), returns, mask), 2 / 3)
    assert math.isnan(float(explained_variance(t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]))))


# --- DPO / IPO ---------------------------------------------------------------------------------------------------


def test_dpo_loss_by_hand():
    # pair 0: pi logratio = -10 - -12 = 2, ref logratio = -11 - -11.5 = 0.5; z = 0.1 * 1.5 = 0.15
    #         -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957
    # pair 1: pi = -5 - -4 = -1, ref = 0; z = -0.1; log(1 + e^0.1) = 0.744397
    losses, chosen, rejected = dpo_loss(t(-10.0, -5.0), t(-12.0, -4.0), t(-11.0, -5.0), t(-11.5, -5.0), beta=0.1)
    close(losses, t(0.620957047789532, 0.744396660073571))
    close(chosen, t(0.1, 0.0))  # 0.1 * (-10 - -11), 0.1 * (-5 - -5)
    close(rejected, t(-0.05, 0.1))  # 0.1 * (-12 - -11.5), 0.1 * (-4 - -5)


def test_ipo_loss_by_hand():
    # beta 0.5 -> target 1/(2*0.5) = 1; h = (-1 - -2) - (-1.5 - -1.5) = 1 -> loss 0
    close(ipo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.5)[0], t(0.0))
    # beta 0.25 -> target 2; h = (-1 - -1) - (-1 - -2) = -1 -> (-1 - 2)^2 = 9
    close(ipo_loss(t(-1.0), t(-1.0), t(-1.0), t(-2.0), beta=0.25)[0], t(9.0))


# --- KL controllers ----------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)  # error 1.0 clipped to 0.2 -> 0.2 * (1 + 0.2 * 0.0256)
    close(ctl.value, 0.201024)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(3.0, n_steps=256)  # error -0.5 clipped to -0.2
    close(ctl.value, 0.198976)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)  # error 0.1 -> 0.2 * 1.00256
    close(ctl.value, 0.200512)
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == pytest.approx(0.200512)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05


def test_leave_one_out_baseline_by_hand():
    # group 1: sum 10 -> (4 s - 10) / 3; group 2: sum 43 -> (4 s - 43) / 3
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 13.0])
    expected = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0, -1.0, -1.0, -1.0, 3.0])
    torch.testing.assert_close(leave_one_out_baseline(scores, 4), expected)
    # s_i minus the mean of the others, written out for one entry
    assert leave_one_out_baseline(scores, 4)[7].item() == pytest.approx(13.0 - (10 + 10 + 10) / 3)
    # what is the same for every answer to a prompt cancels
    shifted = scores + torch.tensor([5.0] * 4 + [-7.0] * 4)
    torch.testing.assert_close(leave_one_out_baseline(shifted, 4), expected)
    torch.testing.assert_close(leave_one_out_baseline(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("group", [1, 3])
def test_leave_one_out_baseline_refuses_what_is_not_groups(group):
    with pytest.raises(ValueError, match="groups"):
        leave_one_out_baseline(torch.zeros(8), group)
