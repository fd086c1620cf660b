"""The evaluation's per-model numbers: KL to the reference along the policy's own answers, win-rate, and every
column of the report against SFT (summarize)."""

from __future__ import annotations

from rlhf_pipeline.modeling.forward import response_kl


def kl_to_reference(policy, reference, rollouts, temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """Per answer, on the policy's own answers: (exact KL, sampled log-ratio), between the two models'
    distributions at `temperature` (the sampling temperature: what the answers were drawn from).

    exact KL  = sum over answer positions of KL(pi(.|prefix) || pi_ref(.|prefix)), over the whole vocabulary:
                never negative and valid for greedy answers too.
    log-ratio = sum over answer tokens of log pi(y_t) - log pi_ref(y_t) (the k1 estimate PPO uses; unbiased only
                for sampled answers, and can be negative for greedy ones).
    Both from modeling.forward.response_kl (the two heads in row chunks, never two [B, R, V] tensors at once).
    """
    exact, log_ratio = [], []
    for r in rollouts:
        per_position, ratio = response_kl(
            policy, reference, r.input_ids, r.attention_mask, r.response_start, temperature=temperature
        )
        mask = r.response_mask.float()
        exact.extend((per_position * mask).sum(-1).tolist())
        log_ratio.extend((ratio * mask).sum(-1).tolist())
    return exact, log_ratio


def win_rate(policy_scores: list[float], sft_scores: list[float]) -> float:
    wins = [1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(policy_scores, sft_scores)]
    return sum(wins) / len(wins)


def summarize(r: dict, sft: dict) -> dict[str, float | None]:
    """One model's columns against SFT, from its per-question lists (`scores`, `judge`, `lengths`, `kls`,
    `log_ratios`; `judge` is None without a judge model):
      reward_mean / win_rate              the proxy reward model's (normalized) score, win-rate vs SFT (ties 0.5)
      judge_reward_mean / judge_win_rate  the same by the independent judge, with the Wilson 95 % interval
      judge_reward_gain                   judge reward minus SFT's on the same questions (the frontier's y)
      judge_win_rate_lc                   length-controlled judge win-rate (logistic fit on the length difference)
      kl, kl_low, kl_high                 mean over answers of the summed per-position KL(pi || pi_SFT) and its t
                                          interval (by the chain rule its mean is the sequence KL)
      kl_seq, kl_seq_low, kl_seq_high     mean of summed token log-ratios (the sampled estimator; needs sampling)
      response_length                     answer tokens, mean
      n, judge_wins / _ties / _losses     questions, and the judge's per-question outcomes vs SFT (counts)
    """
    from rlhf_pipeline.evaluation.statistics import length_controlled, mean_ci, outcomes, win_rate_ci

    n = len(r["scores"])
    kl, kl_seq = mean_ci(r["kls"]), mean_ci(r["log_ratios"])
    out: dict[str, float | None] = {
        "reward_mean": sum(r["scores"]) / n,
        "win_rate": win_rate(r["scores"], sft["scores"]),
        "kl": kl.value,
        "kl_low": kl.low,
        "kl_high": kl.high,
        "kl_seq": kl_seq.value,
        "kl_seq_low": kl_seq.low,
        "kl_seq_high": kl_seq.high,
        "kl_logratio": kl_seq.value,  # the earlier name of kl_seq
        "response_length": sum(r["lengths"]) / n,
        "n": n,
    }
    if r.get("judge") is not None:
        judged = win_rate_ci(r["judge"], sft["judge"])
        per_question = outcomes(r["judge"], sft["judge"])
        diff = [a - b for a, b in zip(r["lengths"], sft["lengths"])]
        out.update(
            judge_reward_mean=sum(r["judge"]) / n,
            judge_reward_gain=(sum(r["judge"]) - sum(sft["judge"])) / n,
            judge_win_rate=judged.value,
            judge_win_low=judged.low,
            judge_win_high=judged.high,
            judge_win_rate_lc=length_controlled(per_question, diff),
            judge_wins=per_question.count(1.0),
            judge_ties=per_question.count(0.5),
            judge_losses=per_question.count(0.0),
        )
    return out
