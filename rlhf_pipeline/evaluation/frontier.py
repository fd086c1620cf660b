"""The KL frontier: every evaluated policy (and checkpoint) and the best-of-n curve at (KL to SFT, judge score),
online (PPO) against offline (DPO/IPO) at matched KL (Tang et al. 2024), and the PNG of it.

A policy's family is its name up to ':' (`ppo:step-10` is a PPO checkpoint); each family's curve starts at SFT
(KL 0). Matched KL: at each offline point's KL, the online curve's judge value is interpolated linearly between
its neighbouring points (only inside the online curve's KL range: no extrapolation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ONLINE, OFFLINE = ("ppo",), ("dpo", "ipo")


def family(name: str) -> str:
    return name.split(":", 1)[0]


def curve(points: dict[str, dict[str, float]], families: Sequence[str], y: str) -> list[tuple[float, float]]:
    """(kl, y) of SFT and every model whose family is in `families`, by KL."""
    pts = [(m["kl"], m[y]) for name, m in points.items() if name == "sft" or family(name) in families]
    return sorted(pts)


def interpolate(pts: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The piecewise-linear curve through `pts` (sorted by KL) at `kl`; None outside its range."""
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return pts[-1][1]


def matched_kl(points: dict[str, dict[str, float]], y: str) -> list[dict[str, float | str | None]]:
    """Per offline model: its KL, its `y`, the online curve's `y` there, and online minus offline."""
    online = curve(points, ONLINE, y)
    rows = []
    for name, m in points.items():
        if family(name) in OFFLINE:
            at = interpolate(online, m["kl"])
            rows.append(
                {
                    "model": name,
                    "kl": m["kl"],
                    "offline": m[y],
                    "online": at,
                    "delta": None if at is None else at - m[y],
                }
            )
    return rows


def plot(points: dict[str, dict[str, float]], best_of_n: list[dict[str, float]], path: Path, y_keys: Sequence[str]):
    """One panel per key in `y_keys` (judge reward, judge win-rate): the best-of-n curve, each family's curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(y_keys), figsize=(6 * len(y_keys), 4.5), squeeze=False)
    for ax, y in zip(axes[0], y_keys):
        if best_of_n and y in best_of_n[0]:
            ax.plot([r["kl"] for r in best_of_n], [r[y] for r in best_of_n], "k--o", label="best-of-n (SFT, proxy)")
            for r in best_of_n:
                ax.annotate(f"n={int(r['n'])}", (r["kl"], r[y]), textcoords="offset points", xytext=(4, -10))
        for families, style, label in ((ONLINE, "b-s", "PPO (online)"), (OFFLINE, "r-^", "DPO/IPO (offline)")):
            pts = curve(points, families, y)
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for name, m in points.items():
            ax.annotate(name, (m["kl"], m[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL(policy || SFT), nats per answer")
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("KL frontier: judge score vs KL to SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
