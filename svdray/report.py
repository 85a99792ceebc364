"""Pictures of a run: the loss curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ema(values: list[float] | tuple[float, ...], decay: float = 0.9) -> list[float]:
    smoothed, current = [], None
    for value in values:
        current = value if current is None else decay * current + (1 - decay) * value
        smoothed.append(current)
    return smoothed


def plot_loss_curve(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One line per metric (e.g. train loss, validation loss) against the optimizer step."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in series.items():
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        # The diffusion loss swings with the sigmas drawn each step: show it faintly, and its
        # exponential moving average as the line to read.
        (raw,) = ax.plot(steps, values, linewidth=0.8, alpha=0.35, marker="." if len(points) < 50 else None)
        ax.plot(steps, ema(values), color=raw.get_color(), linewidth=1.6, label=f"{name} (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
