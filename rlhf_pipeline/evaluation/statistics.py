"""The evaluation's statistics, as pure functions of per-question numbers (no models here).

win_rate_ci          win-rate of a policy against SFT with ties as half a win, and its 95 % Wilson score interval
                     (wins + ties/2 out of n questions; ties pull the variance down, so Wilson is conservative there)
mean_ci              a mean with its Student-t 95 % interval (the sequence KL: mean of summed token log-ratios)
length_controlled    the win-rate at equal length: a logistic regression of the per-question outcome on the
                     length difference (policy - SFT tokens), read off at a difference of 0 (AlpacaEval 2's
                     length-controlled win-rate, with the length difference as the only covariate)
best_of_n_weights    best-of-n from N samples of SFT without drawing again: the plug-in estimate (the empirical
                     distribution of the N samples, n draws with replacement, the best by the proxy reward)
best_of_n_kl         KL(best-of-n || SFT) of that plug-in distribution: an estimate from the samples, at most the
                     log n - (n-1)/n bound, and smaller where samples repeat (same reward = same answer)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


def outcomes(policy_scores: Sequence[float], sft_scores: Sequence[float]) -> list[float]:
    """Per question: 1 when the policy's answer scores higher than SFT's, 0.5 on a tie, 0 otherwise."""
    if len(policy_scores) != len(sft_scores):
        raise ValueError(f"{len(policy_scores)} policy scores vs {len(sft_scores)} SFT scores")
    return [1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(policy_scores, sft_scores)]


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (successes may be fractional: ties as half)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def win_rate_ci(policy_scores: Sequence[float], sft_scores: Sequence[float]) -> Interval:
    wins = outcomes(policy_scores, sft_scores)
    low, high = wilson_interval(sum(wins), len(wins))
    return Interval(sum(wins) / len(wins), low, high)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean and its Student-t interval (a single value: the interval is that value)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("the mean of no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def length_controlled(wins: Sequence[float], length_diff: Sequence[float]) -> float | None:
    """Win-rate at equal length: fit P(win) = sigmoid(a + b * length_diff) by maximum likelihood on the outcomes
    (ties as 0.5: the Bernoulli log-likelihood takes fractional targets) and return sigmoid(a).

    No length difference anywhere: the plain win-rate. All differences equal but not zero, or every outcome the
    same (the fit runs off to infinity): None, length and quality cannot be told apart."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    y = np.asarray(wins, dtype=float)
    d = np.asarray(length_diff, dtype=float)
    if len(y) != len(d) or len(y) == 0:
        raise ValueError(f"{len(y)} outcomes vs {len(d)} length differences")
    if not d.any():
        return float(y.mean())
    scale = d.std()
    if scale == 0 or y.min() == y.max():
        return None
    x = d / scale  # conditioning only: the intercept (the value at difference 0) does not depend on it

    def loss(theta):
        z = theta[0] + theta[1] * x
        return -(y * log_expit(z) + (1 - y) * log_expit(-z)).mean()

    def grad(theta):
        r = expit(theta[0] + theta[1] * x) - y
        return np.array([r.mean(), (r * x).mean()])

    fit = minimize(loss, np.zeros(2), jac=grad, method="BFGS", options={"gtol": 1e-10})
    return float(expit(fit.x[0]))


def best_of_n_weights(proxy_scores: Sequence[float], n: int) -> list[float]:
    """P(sample i is the answer best-of-n picks), n draws with replacement from the N samples (uniform), the best
    by `proxy_scores`; samples with equal scores share their group's probability equally."""
    if n < 1:
        raise ValueError("best-of-n needs n >= 1")
    total = len(proxy_scores)
    order = sorted(range(total), key=lambda i: proxy_scores[i])
    weights = [0.0] * total
    below = 0  # samples scoring less than the current group
    start = 0
    while start < total:
        end = start
        while end < total and proxy_scores[order[end]] == proxy_scores[order[start]]:
            end += 1
        count = end - start
        # P(max of n draws lands in this group) = F(group)^n - F(below)^n
        mass = ((below + count) / total) ** n - (below / total) ** n
        for k in range(start, end):
            weights[order[k]] = mass / count
        below += count
        start = end
    return weights


def best_of_n_kl(proxy_scores: Sequence[float], n: int) -> float:
    """KL(best-of-n || SFT) over the N samples' empirical distribution (each sample 1/N), from best_of_n_weights."""
    total = len(proxy_scores)
    return sum(w * math.log(w * total) for w in best_of_n_weights(proxy_scores, n) if w > 0)


def best_of_n_bound(n: int) -> float:
    """The analytic upper bound log n - (n-1)/n (Stiennon et al. 2020; tight only without repeated answers)."""
    return math.log(n) - (n - 1) / n
