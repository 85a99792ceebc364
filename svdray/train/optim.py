"""The optimizer and learning-rate schedule of every loop (training, reward stage, benchmarks),
built from `optim.*` and `speed.fused_adamw` in one place, so no loop can ignore a key."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from svdray.config import OptimConfig, SpeedConfig

# `optim.schedule` -> diffusers' scheduler name; both warm up linearly over `optim.warmup_steps`.
SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(
    params: list[torch.nn.Parameter], optim: OptimConfig, speed: SpeedConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with `optim.*`; fused kernel per `speed.fused_adamw` (null: on CUDA only)."""
    fused = device.type == "cuda" if speed.fused_adamw is None else speed.fused_adamw
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """`optim.schedule` over `max_steps` optimizer steps, after `optim.warmup_steps` of warm-up."""
    return get_scheduler(
        SCHEDULES[optim.schedule],
        optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=max_steps,
    )
