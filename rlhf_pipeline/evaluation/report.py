"""The evaluation's Markdown report: the side-by-side table and sample generations."""

from __future__ import annotations

from typing import Any

from rlhf_pipeline.evaluation.markdown_safe import inline


def report_markdown(
    models: dict[str, dict[str, float]],
    questions: list[str],
    results: dict,
    cfg: Any,
    rm_accuracy: float | None,
) -> str:
    decoding = f"sampling (T={cfg.temperature}, top-p={cfg.top_p}, seed {cfg.seed})" if cfg.do_sample else "greedy"
    lines = [
        "# Evaluation: SFT vs aligned policies",
        "",
        f"{len(questions)} held-out questions, {decoding} decoding, at most {cfg.max_new_tokens} new tokens. "
        f"Reward = reward model score normalized by its held-out mean/std"
        + (f" (reward model pairwise accuracy {rm_accuracy:.3f})" if rm_accuracy is not None else "")
        + ". "
        "Win-rate is against SFT (ties 0.5); KL = mean over the policy's own answers of the per-position "
        "KL(pi || pi_SFT), summed over the answer.",
        "",
        "| model | reward_mean | win_rate vs SFT | KL to SFT | response length |",
        "|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m['reward_mean']:.3f} | {m['win_rate']:.3f} | {m['kl']:.3f} | {m['response_length']:.1f} |"
        )
    lines += ["", "## Sample generations", ""]
    for i in range(min(cfg.samples_in_report, len(questions))):
        question = questions[i].strip().replace("\n", " ")
        lines += [f"### Q{i + 1}: {inline(question[:300])}{'...' if len(question) > 300 else ''}", ""]
        for name, r in results.items():
            answer = r["responses"][i].strip().replace("\n", " ") or "(empty)"
            lines += [f"- **{name}** (reward {r['scores'][i]:.2f}): {inline(answer[:500])}"]
        lines.append("")
    return "\n".join(lines) + "\n"
