"""The evaluation's Markdown report: the side-by-side table (proxy and judge columns), the KL frontier (plot, best-of-n
table, online vs offline at matched KL), and sample generations."""

from __future__ import annotations

from typing import Any

from rlhf_pipeline.evaluation.markdown_safe import inline


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _judge_cell(m: dict) -> str:
    if "judge_win_rate" not in m:
        return "-"
    return f"{m['judge_win_rate']:.3f} [{m['judge_win_low']:.3f}, {m['judge_win_high']:.3f}]"


def did_it_help(models: dict[str, dict[str, Any]], challenger: str | None) -> list[str]:
    """The opening lines: each policy next to SFT by the judge (the proxy without one): win-rate with its 95 %
    interval, n questions and wins / ties / losses."""
    lines = []
    for name, m in models.items():
        if name == "sft":
            continue
        mark = " (challenger)" if name == challenger else ""
        if "judge_win_rate" in m:
            lines.append(
                f"- **{inline(name)}**{mark} vs SFT, judged on {m['n']} questions: win-rate {_judge_cell(m)}, "
                f"{m['judge_wins']} wins / {m['judge_ties']} ties / {m['judge_losses']} losses "
                f"(proxy win-rate {m['win_rate']:.3f}, KL {m['kl']:.3f})"
            )
        else:
            lines.append(
                f"- **{inline(name)}**{mark} vs SFT on {m['n']} questions: proxy win-rate {m['win_rate']:.3f} "
                f"(no judge), KL {m['kl']:.3f}"
            )
    return ["## Did it help?", "", *lines, ""] if lines else []


def report_markdown(
    models: dict[str, dict[str, Any]],
    questions: list[str],
    results: dict,
    cfg: Any,
    rm_accuracy: float | None,
    best_of_n: list[dict[str, float]] | None = None,
    matched: dict[str, list[dict]] | None = None,
    challenger: str | None = None,
) -> str:
    decoding = f"sampling (T={cfg.temperature}, top-p={cfg.top_p}, seed {cfg.seed})" if cfg.do_sample else "greedy"
    judged = getattr(cfg, "judge_model", None)
    lines = [
        "# Evaluation: SFT vs aligned policies",
        "",
        *did_it_help(models, challenger),
        f"{len(questions)} held-out questions, {decoding} decoding, at most {cfg.max_new_tokens} new tokens. "
        "Proxy = the reward model PPO optimized"
        + (f" (pairwise accuracy {rm_accuracy:.3f})" if rm_accuracy is not None else "")
        + "; judge = "
        + (f"`{judged}`, a reward model trained on questions no other stage saw" if judged else "none given")
        + ". Rewards are normalized by each model's held-out mean/std. Win-rates are against SFT with ties as half; "
        "the judge's has its 95 % Wilson interval; LC = length-controlled (logistic fit of the outcome on the "
        "length difference, read at equal length). KL = mean over the policy's own answers of the per-position "
        "KL(pi || pi_SFT) summed over the answer, with its 95 % t interval"
        + ("" if cfg.do_sample else " (greedy answers: a KL along them, not the sampled sequence KL)")
        + ".",
        "",
        "| model | proxy reward | proxy win-rate | judge reward | judge win-rate [95% CI] | judge LC win-rate "
        "| KL to SFT [95% CI] | length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m['reward_mean']:.3f} | {m['win_rate']:.3f} | {_num(m.get('judge_reward_mean'))} "
            f"| {_judge_cell(m)} | {_num(m.get('judge_win_rate_lc'))} "
            f"| {m['kl']:.3f} [{m['kl_low']:.3f}, {m['kl_high']:.3f}] | {m['response_length']:.1f} |"
        )
    if challenger:
        lines += [
            "",
            f"Challenger: **{challenger}** (highest {'judge' if judged else 'proxy'} win-rate vs SFT among the "
            "policies; lower KL on a tie).",
        ]
    lines += ["", "## KL frontier", "", "![KL frontier](frontier.png)", ""]
    if best_of_n:
        has_judge = "judge_win_rate" in best_of_n[0]
        lines += [
            f"Best-of-n from SFT ({getattr(cfg, 'best_of_n', '')} samples per question drawn once"
            + (f", the first {cfg.best_of_n_questions} questions" if getattr(cfg, "best_of_n_questions", None) else "")
            + "; n picked by the proxy; KL estimated from the samples, next to the log n - (n-1)/n bound):",
            "",
            "| n | proxy reward | judge reward | judge gain over SFT (same questions) | judge win-rate | KL (estimate) "
            "| KL bound | length |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in best_of_n:
            lines.append(
                f"| {int(r['n'])} | {r['reward_mean']:.3f} | {_num(r.get('judge_reward_mean')) if has_judge else '-'} "
                f"| {_num(r.get('judge_reward_gain')) if has_judge else '-'} "
                f"| {_num(r.get('judge_win_rate')) if has_judge else '-'} | {r['kl']:.3f} | {r['kl_bound']:.3f} "
                f"| {r['response_length']:.1f} |"
            )
        lines.append("")
    for y, rows in (matched or {}).items():
        if rows:
            lines += [f"Online (PPO) vs offline at matched KL, {y.replace('_', ' ')} (PPO curve interpolated):", ""]
            lines += ["| offline model | KL | offline | PPO at that KL | PPO - offline |", "|---|---|---|---|---|"]
            for r in rows:
                lines.append(
                    f"| {r['model']} | {r['kl']:.3f} | {r['offline']:.3f} | {_num(r['online'])} | {_num(r['delta'])} |"
                )
            lines.append("")
    lines += ["## Sample generations", ""]
    for i in range(min(cfg.samples_in_report, len(questions))):
        question = questions[i].strip().replace("\n", " ")
        lines += [f"### Q{i + 1}: {inline(question[:300])}{'...' if len(question) > 300 else ''}", ""]
        for name, r in results.items():
            answer = r["responses"][i].strip().replace("\n", " ") or "(empty)"
            judge = f", judge {r['judge'][i]:.2f}" if r.get("judge") is not None else ""
            lines += [f"- **{name}** (proxy {r['scores'][i]:.2f}{judge}): {inline(answer[:500])}"]
        lines.append("")
    return "\n".join(lines) + "\n"
