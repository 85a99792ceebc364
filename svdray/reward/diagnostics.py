"""Reward diagnostics: run before every reward training (and as `svdray reward-check`), and
every `reward.check_every` steps during it.

They exist because of how reward fine-tuning fails silently (see SVD_TRAINING_NOTES): rewards
that are all 0.0 because [0, 1] code got [-1, 1] frames, scorers under no_grad or behind a uint8
cast that pass no gradient, constant or thresholded rewards with nothing to climb.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from svdray.reward.rewards import RewardSet

RANGE_TOLERANCE = 1e-3


class RewardCheckError(RuntimeError):
    """Reward training refuses to start (or stops) and says why."""


@dataclass
class RewardStats:
    name: str
    mean: float
    std: float | None  # None for a single sample: constancy needs two samples to judge
    min: float
    max: float
    zero_fraction: float
    received_min: float
    received_max: float
    received_dtype: str
    declared_range: tuple[float, float]
    grad_norm: float  # of this reward's mean w.r.t. the LoRA parameters

    def problems(self) -> list[str]:
        found = []
        lo, hi = self.declared_range
        if self.received_min < lo - RANGE_TOLERANCE or self.received_max > hi + RANGE_TOLERANCE:
            found.append(
                f"reward '{self.name}' declares pixels in [{lo:g}, {hi:g}] but received "
                f"[{self.received_min:.3f}, {self.received_max:.3f}] ({self.received_dtype}): the frames are "
                "in the wrong range (decoded frames are [-1, 1]; set reward.convert_inputs: true or fix "
                "the scorer)"
            )
        if self.zero_fraction == 1.0:
            found.append(f"reward '{self.name}' is exactly 0.0 for every sample")
        elif self.std == 0.0:  # needs batch size >= 2 (reward-check always samples at least two)
            found.append(f"reward '{self.name}' is constant ({self.mean:g}) across samples: nothing to climb")
        if not self.grad_norm > 0.0:
            found.append(
                f"no gradient reaches the LoRA parameters from reward '{self.name}' "
                f"(grad norm {self.grad_norm:g}): is the scorer under torch.no_grad, detached, or behind an "
                "integer cast?"
            )
        return found


def diagnose(
    rewards: RewardSet, frames: torch.Tensor, image: torch.Tensor, lora_params: list[torch.nn.Parameter]
) -> list[RewardStats]:
    """Per-reward statistics on one sampled batch (frames keep their graph to the LoRA weights)."""
    stats = []
    for name, reward in zip(rewards.names, rewards.rewards, strict=True):
        inputs, cond_image = rewards.inputs_for(reward, frames, image)
        scores = reward(inputs, cond_image)
        grad_norm = 0.0
        if scores.requires_grad:
            grads = torch.autograd.grad(
                scores.float().mean(), lora_params, retain_graph=True, allow_unused=True
            )
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            grad_norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        detached = scores.detach().float()
        stats.append(
            RewardStats(
                name=name,
                mean=float(detached.mean()),
                std=float(detached.std()) if detached.numel() > 1 else None,
                min=float(detached.min()),
                max=float(detached.max()),
                zero_fraction=float((detached == 0).float().mean()),
                received_min=float(inputs.detach().min()),
                received_max=float(inputs.detach().max()),
                received_dtype=str(inputs.dtype).replace("torch.", ""),
                declared_range=tuple(reward.input_range),
                grad_norm=grad_norm,
            )
        )
    return stats


def report(stats: list[RewardStats]) -> dict:
    return {"rewards": [asdict(s) for s in stats], "problems": [p for s in stats for p in s.problems()]}


def format_table(stats: list[RewardStats]) -> str:
    columns = ["reward", "mean", "std", "min", "max", "zeros", "received", "declared", "grad"]
    widths = [12, 10, 10, 10, 10, 7, 18, 12, 11]
    rows = [columns]
    for s in stats:
        std = "n/a" if s.std is None else f"{s.std:.3g}"
        rows.append(
            [
                s.name,
                f"{s.mean:.4g}",
                std,
                f"{s.min:.4g}",
                f"{s.max:.4g}",
                f"{s.zero_fraction:.0%}",
                f"[{s.received_min:.2f},{s.received_max:.2f}]",
                f"[{s.declared_range[0]:g},{s.declared_range[1]:g}]",
                f"{s.grad_norm:.3g}",
            ]
        )
    return "\n".join(
        row[0].ljust(widths[0]) + "".join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        for row in rows
    )


def raise_on_problems(stats: list[RewardStats], when: str) -> None:
    problems = [p for s in stats for p in s.problems()]
    if problems:
        raise RewardCheckError(f"{when}:\n  - " + "\n  - ".join(problems) + "\n" + format_table(stats))
