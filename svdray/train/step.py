"""One optimizer update of any family, as every loop runs it (the Ray Train loop, the tests that
spawn gloo ranks): accumulate gradients over micro-batches, clip, update unless something is not
finite on some worker. Imports neither Ray nor MLflow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from svdray.config import Config
from svdray.models.base import ModelFamily, TrainingModels
from svdray.models.precision import mixed_precision
from svdray.train.distributed import all_workers_finite
from svdray.train.parallel import Parallel


def update(
    parallel: Parallel,
    models: TrainingModels,
    family: ModelFamily,
    data: Iterator[dict[str, Any]],
    cfg: Config,
    generator: torch.Generator,
    step: int,
    optimizer: torch.optim.Optimizer,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer update: gradients accumulated over `train.grad_accum` micro-batches, clipped
    to `optim.max_grad_norm`, applied only if the loss and the gradient norm are finite on every
    worker. Returns (summed loss, gradient norm before clipping, whether the update was applied)."""
    loss = accumulate_gradients(parallel, models, family, data, cfg, generator, step)
    grad_norm = parallel.clip_grad_norm(cfg.optim.max_grad_norm)
    good = all_workers_finite(loss, grad_norm)
    if good:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, good


def accumulate_gradients(
    parallel: Parallel,
    models: TrainingModels,
    family: ModelFamily,
    data: Iterator[dict[str, Any]],
    cfg: Config,
    generator: torch.Generator,
    step: int,
) -> torch.Tensor:
    """Forward and backward over `train.grad_accum` micro-batches; returns the summed loss (each
    micro-batch's loss divided by grad_accum, so the gradient is the mean's)."""
    device = next(models.denoiser.parameters()).device
    autocast = mixed_precision(cfg.train.mixed_precision, device)
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.train.grad_accum):
        try:
            batch = next(data)
        except StopIteration:
            raise RuntimeError(f"the data ran out at step {step}: too many clips failed to decode") from None
        # Gradients are reduced across workers on the last micro-batch of an update only.
        with autocast, parallel.gradient_sync(micro == cfg.train.grad_accum - 1):
            with saved_activations(cfg.train.offload_activations, device):
                loss = family.training_loss(parallel.module, models.frozen, batch, cfg, generator)
            loss = loss / cfg.train.grad_accum
            if step in cfg.train.debug_nan_at_steps:  # fault injection
                loss = loss * float("nan")
            parallel.backward(loss)
        loss_sum += loss.detach()
    return loss_sum


def saved_activations(offload: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """Around the forward: where the tensors it saves for backward wait. `train.offload_activations`:
    in (pinned) host memory, each copied back when backward reaches it (torch's `save_on_cpu`).
    With every block checkpointed those are the blocks' inputs (Wan 14B at 81x480x832: 13 GiB),
    and one block's recomputation, which backward runs on the device, stays on it."""
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
