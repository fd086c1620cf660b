"""The evaluation's per-answer statistics: KL to the reference along the policy's own answers, and win-rate."""

from __future__ import annotations

from rlhf_pipeline.modeling.forward import response_kl


def kl_to_reference(policy, reference, rollouts) -> tuple[list[float], list[float]]:
    """Per answer, on the policy's own answers: (exact KL, sampled log-ratio).

    exact KL  = sum over answer positions of KL(pi(.|prefix) || pi_ref(.|prefix)), over the whole vocabulary:
                never negative and valid for greedy answers too.
    log-ratio = sum over answer tokens of log pi(y_t) - log pi_ref(y_t) (the k1 estimate PPO uses; unbiased only
                for sampled answers, and can be negative for greedy ones).
    Both from modeling.forward.response_kl (the two heads in row chunks, never two [B, R, V] tensors at once).
    """
    exact, log_ratio = [], []
    for r in rollouts:
        per_position, ratio = response_kl(policy, reference, r.input_ids, r.attention_mask, r.response_start)
        mask = r.response_mask.float()
        exact.extend((per_position * mask).sum(-1).tolist())
        log_ratio.extend((ratio * mask).sum(-1).tolist())
    return exact, log_ratio


def win_rate(policy_scores: list[float], sft_scores: list[float]) -> float:
    wins = [1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(policy_scores, sft_scores)]
    return sum(wins) / len(wins)
