"""The best-of-n reference curve: N answers per question from SFT, drawn once; best-of-n for n = 1, 2, 4, ... N
is read off those samples (statistics.best_of_n_weights: the plug-in estimate, n draws with replacement from the
N samples, the best by the PROXY reward model), and placed on the judge's axes like every policy.

Per n, averaged over questions: the judge reward of the picked answer, its judge win-rate against SFT's evaluated
answer (ties half), the proxy reward, the answer length, and KL(best-of-n || SFT) estimated from the samples
(statistics.best_of_n_kl), not the log n - (n-1)/n bound.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhf_pipeline.evaluation.statistics import best_of_n_bound, best_of_n_kl, best_of_n_weights


def sizes(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to num_samples (and num_samples itself)."""
    out, n = [], 1
    while n < num_samples:
        out.append(n)
        n *= 2
    return [*out, num_samples]


def best_of_n_curve(
    proxy: Sequence[Sequence[float]],
    judge: Sequence[Sequence[float]] | None,
    lengths: Sequence[Sequence[float]],
    sft_judge: Sequence[float] | None,
) -> list[dict[str, float]]:
    """One row per n: proxy[q][i], judge[q][i], lengths[q][i] are sample i of question q; sft_judge[q] is the judge
    score of SFT's evaluated answer to q (the win-rate's opponent). `judge_reward_gain` is the judge reward minus
    SFT's on these questions: best-of-n may run on fewer questions than the policies (`best_of_n_questions`), whose
    means are then not comparable, while paired gains are."""
    num_samples = len(proxy[0])
    rows = []
    for n in sizes(num_samples):
        totals = dict.fromkeys(("reward_mean", "judge_reward_mean", "judge_win_rate", "response_length", "kl"), 0.0)
        for q, scores in enumerate(proxy):
            weights = best_of_n_weights(scores, n)
            totals["reward_mean"] += sum(w * s for w, s in zip(weights, scores))
            totals["response_length"] += sum(w * x for w, x in zip(weights, lengths[q]))
            totals["kl"] += best_of_n_kl(scores, n)
            if judge is not None and sft_judge is not None:
                totals["judge_reward_mean"] += sum(w * j for w, j in zip(weights, judge[q]))
                totals["judge_win_rate"] += sum(
                    w * (1.0 if j > sft_judge[q] else 0.5 if j == sft_judge[q] else 0.0)
                    for w, j in zip(weights, judge[q])
                )
        row = {"n": float(n), **{k: v / len(proxy) for k, v in totals.items()}, "kl_bound": best_of_n_bound(n)}
        if judge is None or sft_judge is None:
            del row["judge_reward_mean"], row["judge_win_rate"]
        else:  # against SFT on the SAME questions: comparable with a policy's gain on every question
            row["judge_reward_gain"] = row["judge_reward_mean"] - sum(sft_judge) / len(sft_judge)
        rows.append(row)
    return rows
