"""Training curves as one figure per stage run (`<stage>/curves.png`), drawn from the run's own MLflow metric
history at the end of the stage, so a resumed run's figure holds every step, not only the last segment's."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = list[tuple[int, float]]  # (step, value)

# Per stage: the panels of its figure, each a title and the metrics drawn as lines on the same axes.
STAGE_CURVES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "sft": [("loss", ("sft/loss",)), ("gradient norm", ("sft/grad_norm",)), ("learning rate", ("sft/lr",))],
    "reward": [
        ("pairwise loss", ("rm/loss",)),
        ("accuracy (train batch, held-out)", ("rm/train_accuracy", "rm/accuracy")),
        ("margin chosen - rejected", ("rm/train_margin", "rm/margin")),
    ],
    "ppo": [
        ("reward (normalized)", ("ppo/reward_mean",)),
        ("KL to SFT per response", ("ppo/kl",)),
        ("clipped share", ("ppo/clipfrac", "ppo/vf_clipfrac")),
        ("approx. KL of the update", ("ppo/approx_kl",)),
        ("losses", ("ppo/policy_loss", "ppo/value_loss")),
        ("entropy", ("ppo/entropy",)),
    ],
    "dpo": [
        ("loss", ("dpo/loss",)),
        ("implicit reward margin", ("dpo/margin",)),
        ("implicit rewards", ("dpo/chosen_reward", "dpo/rejected_reward")),
        ("reward accuracy", ("dpo/reward_accuracy",)),
    ],
}


def curves_figure(title: str, panels: list[tuple[str, dict[str, Series]]]) -> Figure:
    """One axes per panel (in a grid of up to 3 columns), one line per metric (x = step), its key as the label."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (panel_title, series) in zip(axes, panels):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def stage_panels(stage: str, history: dict[str, Series]) -> list[tuple[str, dict[str, Series]]]:
    """The stage's panels filled from `history` (metric -> points); metrics never logged and empty panels left out."""
    panels = []
    for panel_title, keys in STAGE_CURVES.get(stage, []):
        series = {k: history[k] for k in keys if history.get(k)}
        if series:
            panels.append((panel_title, series))
    return panels


def log_training_curves(run, stage: str) -> None:
    """Draw the stage's curves from its MLflow run and log them as `<stage>/curves.png` (main process only; an
    unreachable server or a stage without curves logs nothing: the figure never fails a trained stage)."""
    from rlhf_pipeline.tracking import StageRun, tqdm_write

    if not isinstance(run, StageRun) or stage not in STAGE_CURVES:
        return
    import mlflow

    try:
        run.flush(required=True)
        client = mlflow.tracking.MlflowClient()
        keys = {k for _, panel in STAGE_CURVES[stage] for k in panel}
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run.run_id, k)] for k in keys}
        panels = stage_panels(stage, {k: sorted(v) for k, v in history.items()})
        if panels:
            mlflow.log_figure(curves_figure(f"{stage}: training curves", panels), f"{stage}/curves.png")
    except Exception as exc:  # noqa: BLE001 (an outage or a plotting error is never worth a failed stage)
        tqdm_write(f"{stage}: training curves not logged ({(str(exc) or repr(exc)).splitlines()[0]})")
