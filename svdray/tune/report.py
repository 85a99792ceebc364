"""What a sweep shows at the end: a summary table (terminal and CSV) and the objective plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FINISHED, STOPPED, ERRORED = "finished", "stopped_early", "error"
# Objectives closer than this (relative) rank as tied: a difference this small between trials of
# a few dozen steps is noise, not a reason to prefer one setting.
TIE_TOLERANCE = 0.005


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]  # the searched keys' values
    status: str  # finished | stopped_early | error
    steps: int  # optimizer steps done
    objective: float | None  # last reported objective
    run_id: str | None = None  # the trial's (child) MLflow run
    metrics: dict[str, Any] = field(default_factory=dict)
    val_loss: float | None = None  # its latest validation loss (fixed sigma grid and noise)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ranks(trials: list[TrialSummary], mode: str = "min") -> dict[str, str]:
    """Each scored trial's rank by objective ("1", "2", ...); a trial whose objective is within
    TIE_TOLERANCE of the one ranked just above it shares its rank, marked "=" ("2=", "2=")."""
    scored = sorted(
        (t for t in trials if t.objective is not None),
        key=lambda t: t.objective if mode == "min" else -t.objective,
    )
    labels: dict[str, str] = {}
    tied_with_previous = [
        i > 0 and abs(t.objective - scored[i - 1].objective) <= TIE_TOLERANCE * abs(scored[i - 1].objective)
        for i, t in enumerate(scored)
    ]
    rank = 0
    for i, t in enumerate(scored):
        rank = rank if tied_with_previous[i] else i + 1
        tied = tied_with_previous[i] or (i + 1 < len(scored) and tied_with_previous[i + 1])
        labels[t.trial_id] = f"{rank}=" if tied else str(rank)
    return labels


def summary_rows(
    trials: list[TrialSummary], keys: list[str], best: TrialSummary | None, mode: str = "min"
) -> list[dict]:
    """One row per trial: the searched values, steps, objective and its rank ("=": tied within
    0.5%), the latest validation loss, status and MLflow run."""
    rank_of = ranks(trials, mode)
    rows = []
    for t in trials:
        row = {"trial": t.trial_id + (" *" if best is not None and t is best else "")}
        row.update({k: t.params.get(k) for k in keys})
        objective = "" if t.objective is None else t.objective
        row.update({"steps": t.steps, "objective": objective, "rank": rank_of.get(t.trial_id, "")})
        row["val_loss"] = "" if t.val_loss is None else t.val_loss
        row.update({"status": t.status, "mlflow_run": t.run_id})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Fixed-width columns, one trial per line; a note under it when trials tie."""
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    if any(str(row.get("rank", "")).endswith("=") for row in rows):
        lines.append(f"=: tied, objectives within {TIE_TOLERANCE:.1%} of each other")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_objective(
    trials: list[TrialSummary], x_key: str, series_key: str | None, path: Path, title: str, ylabel: str
) -> Path:
    """Final objective against `x_key` (log axis when the values span decades), one series per
    value of `series_key`; filled markers for finished trials, hollow for stopped ones."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    done = [t for t in trials if t.objective is not None and t.params.get(x_key) is not None]
    groups: dict[Any, list[TrialSummary]] = {}
    for t in done:
        groups.setdefault(t.params.get(series_key) if series_key else None, []).append(t)
    for index, (value, group) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        color = f"C{index % 10}"
        group.sort(key=lambda t: t.params[x_key])
        label = f"{series_key} = {value}" if series_key else None
        # Lines join trials that ran every step; a stopped trial's objective is from fewer steps.
        finished = [t for t in group if t.status == FINISHED]
        ax.plot(
            [t.params[x_key] for t in finished],
            [t.objective for t in finished],
            color=color,
            linewidth=1,
            alpha=0.6,
            label=label,
        )
        for t in group:
            filled = t.status == FINISHED
            ax.scatter(
                t.params[x_key], t.objective, color=color if filled else "none", edgecolors=color, zorder=3
            )
    xs = [t.params[x_key] for t in done if isinstance(t.params[x_key], (int, float))]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series_key and groups:
        ax.legend(title="filled: finished, hollow: stopped early", title_fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_axes(keys: list[str], trials: list[TrialSummary]) -> tuple[str | None, str | None]:
    """x: optim.lr when searched, else the first numeric searched key; series: lora.rank when
    searched, else none."""

    def numeric(key: str) -> bool:
        return all(
            isinstance(t.params.get(key), (int, float)) and math.isfinite(t.params[key])
            for t in trials
            if key in t.params
        )

    x_key = "optim.lr" if "optim.lr" in keys else next((k for k in keys if numeric(k)), None)
    series_key = "lora.rank" if "lora.rank" in keys and x_key != "lora.rank" else None
    return x_key, series_key
