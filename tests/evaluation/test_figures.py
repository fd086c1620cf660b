"""The evaluation's figures hold the numbers they are given: one histogram per model and scorer on shared bins,
one bar per model per compared column with its interval."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.container import BarContainer

from rlhf_pipeline.evaluation.figures import comparison_figure, reward_distributions_figure


def test_reward_distributions_overlay_every_model_on_the_same_bins():
    scores = {
        "sft": {"proxy": [-1.0, 0.0, 0.0, 1.0], "judge": [0.0, 0.5, 0.5, 2.0]},
        "ppo": {"proxy": [0.0, 1.0, 1.0, 3.0], "judge": [1.0, 1.0, 1.5, 2.0]},
    }
    fig = reward_distributions_figure(scores, bins=4)
    proxy, judge = fig.axes
    assert proxy.get_title() == "proxy reward per answer" and judge.get_title() == "judge reward per answer"
    for ax, scorer in ((proxy, "proxy"), (judge, "judge")):
        assert len(ax.containers) == 2  # one histogram per model, overlaid in one chart
        pooled = scores["sft"][scorer] + scores["ppo"][scorer]
        edges = np.linspace(min(pooled), max(pooled), 5)
        for container, name in zip(ax.containers, ("sft", "ppo")):
            heights = [bar.get_height() for bar in container]
            assert heights == np.histogram(scores[name][scorer], bins=edges)[0].tolist()
            assert [bar.get_x() for bar in container] == pytest.approx(edges[:-1].tolist())
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [
            f"sft (mean {np.mean(scores['sft'][scorer]):.2f})",
            f"ppo (mean {np.mean(scores['ppo'][scorer]):.2f})",
        ]


def test_without_a_judge_only_the_proxy_panel():
    fig = reward_distributions_figure({"sft": {"proxy": [0.0, 1.0], "judge": None}, "ppo": {"proxy": [1.0, 2.0]}})
    assert [ax.get_title() for ax in fig.axes] == ["proxy reward per answer"]


def _bars(ax) -> BarContainer:
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    return bars


def _model(reward, win, kl, length, judge=None):
    m = {"reward_mean": reward, "win_rate": win, "kl": kl, "kl_low": kl - 0.1, "kl_high": kl + 0.2}
    m["response_length"] = length
    if judge is not None:
        m.update(judge_reward_mean=judge, judge_win_rate=win, judge_win_low=win - 0.2, judge_win_high=win + 0.1)
    return m


def test_comparison_has_a_bar_per_model_in_every_panel_with_its_interval():
    models = {"sft": _model(0.0, 0.5, 0.0, 30.0, 0.1), "ppo": _model(0.4, 0.7, 1.5, 28.0, 0.3)}
    models["dpo"] = _model(0.2, 0.6, 0.8, 31.0, 0.2)
    fig = comparison_figure(models)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {
        "judge win-rate vs SFT",
        "proxy win-rate vs SFT",
        "judge reward (mean)",
        "proxy reward (mean)",
        "KL(policy || SFT) per answer",
        "answer length (tokens)",
    }
    for title, key in (("proxy reward (mean)", "reward_mean"), ("answer length (tokens)", "response_length")):
        ax = panels[title]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["sft", "ppo", "dpo"]
        assert [bar.get_height() for bar in _bars(ax)] == [models[n][key] for n in models]
    kl = _bars(panels["KL(policy || SFT) per answer"])
    assert [bar.get_height() for bar in kl] == [models[n]["kl"] for n in models]
    low, high = zip(*(seg[:, 1] for seg in kl.errorbar.lines[2][0].get_segments()))
    assert low == pytest.approx([models[n]["kl_low"] for n in models])
    assert high == pytest.approx([models[n]["kl_high"] for n in models])
    # the tie line on the win-rate panels
    tie = panels["judge win-rate vs SFT"].lines[-1]
    assert list(tie.get_xdata()) == [0, 1] and list(tie.get_ydata()) == [0.5, 0.5]


def test_comparison_without_a_judge_leaves_the_judge_panels_out():
    fig = comparison_figure({"sft": _model(0.0, 0.5, 0.0, 30.0), "ppo": _model(0.4, 0.7, 1.5, 28.0)})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "judge win-rate vs SFT" not in titles and "proxy win-rate vs SFT" in titles and len(titles) == 4
