"""The evaluation's figures, SFT and every policy on shared axes: the per-answer reward distributions (proxy and
judge) and the side-by-side comparison of the report's columns. Pure functions: numbers in, a Figure out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (column of metrics.summarize, panel title, (low, high) columns of its 95 % interval or None)
COMPARED = (
    ("judge_win_rate", "judge win-rate vs SFT", ("judge_win_low", "judge_win_high")),
    ("win_rate", "proxy win-rate vs SFT", None),
    ("judge_reward_mean", "judge reward (mean)", None),
    ("reward_mean", "proxy reward (mean)", None),
    ("kl", "KL(policy || SFT) per answer", ("kl_low", "kl_high")),
    ("response_length", "answer length (tokens)", None),
)


def reward_distributions_figure(scores: dict[str, dict[str, list[float] | None]], bins: int = 12) -> Figure:
    """Overlaid histograms, one per model, of its answers' rewards: a panel per scorer (`proxy`, `judge`), the
    same bins for every model so the bars compare. `scores`: model -> {"proxy": [...], "judge": [...] or None}."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scorers = [s for s in ("proxy", "judge") if any(v.get(s) for v in scores.values())]
    fig = Figure(figsize=(5.5 * len(scorers), 3.6), layout="constrained")
    axes = fig.subplots(1, len(scorers), squeeze=False).ravel()
    for ax, scorer in zip(axes, scorers):
        present = {name: v[scorer] for name, v in scores.items() if v.get(scorer)}
        edges = np.histogram_bin_edges(np.concatenate([np.asarray(x, float) for x in present.values()]), bins=bins)
        for name, values in present.items():
            ax.hist(values, bins=edges, alpha=0.45, label=f"{name} (mean {np.mean(values):.2f})")
        ax.set_title(f"{scorer} reward per answer")
        ax.set_xlabel("normalized reward")
        ax.set_ylabel("answers")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        ax.legend(fontsize="small")
    fig.suptitle("Reward distributions: SFT vs policies")
    return fig


def comparison_figure(models: dict[str, dict[str, Any]]) -> Figure:
    """A panel per compared column (those every model has), a bar per model (SFT first, in `models` order), with
    the 95 % interval as an error bar where the evaluation has one."""
    from matplotlib.figure import Figure

    names = list(models)
    shown = [c for c in COMPARED if all(models[n].get(c[0]) is not None for n in names)]
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    colors = [f"C{i}" for i in range(len(names))]
    for ax, (key, title, interval) in zip(axes, shown):
        values = [float(models[n][key]) for n in names]
        errors = None
        if interval and all(models[n].get(interval[0]) is not None for n in names):
            low = [v - float(models[n][interval[0]]) for n, v in zip(names, values)]
            high = [float(models[n][interval[1]]) - v for n, v in zip(names, values)]
            errors = [low, high]
        ax.bar(names, values, yerr=errors, capsize=4, color=colors)
        if key.endswith("win_rate"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # a tie with SFT
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle("SFT vs policies on the held-out questions")
    return fig
