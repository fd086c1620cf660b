"""Training curves: a panel per plotted quantity, a line per metric holding exactly the logged (step, value)
points; the figure logged with a real stage run reads the run's own metric history."""

from __future__ import annotations

from rlhf_pipeline.training.curves import STAGE_CURVES, curves_figure, stage_panels


def test_each_line_is_the_logged_series():
    history = {
        "ppo/reward_mean": [(1, -0.5), (2, 0.1), (3, 0.4)],
        "ppo/kl": [(1, 0.0), (2, 0.2), (3, 0.3)],
        "ppo/clipfrac": [(1, 0.05), (2, 0.1), (3, 0.2)],
        "ppo/vf_clipfrac": [(1, 0.0), (2, 0.3), (3, 0.1)],
        "rm/loss": [(1, 0.7)],  # another stage's metric: not in the PPO figure
    }
    panels = stage_panels("ppo", history)
    # panels whose metrics were never logged (approx_kl, losses, entropy here) are left out
    assert [title for title, _ in panels] == ["reward (normalized)", "KL to SFT per response", "clipped share"]
    fig = curves_figure("ppo: training curves", panels)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [title for title, _ in panels]
    clip = visible[2]
    assert [line.get_label() for line in clip.lines] == ["ppo/clipfrac", "ppo/vf_clipfrac"]
    for line, key in zip(clip.lines, ("ppo/clipfrac", "ppo/vf_clipfrac")):
        assert list(zip(line.get_xdata(), line.get_ydata())) == history[key]
    assert visible[0].get_xlabel() == "step" and fig.get_suptitle() == "ppo: training curves"


def test_every_training_stage_has_curves():
    assert set(STAGE_CURVES) == {"sft", "reward", "ppo", "dpo"}
    assert stage_panels("evaluate", {"eval/kl": [(0, 1.0)]}) == []
