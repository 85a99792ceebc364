"""Which dtype each model computes in: the frozen encoders in their own dtype with autocast off,
the denoiser under bf16 autocast when `train.mixed_precision` is "bf16" (on any device, so the GPU
configs' precision path also runs in CPU tests). Training, validation and sampling use these."""

from __future__ import annotations

import contextlib

import torch


def encoder_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off around the frozen encoders: they run in their own dtype (`model.frozen_dtype`)
    whatever the denoiser's mixed precision, as in Stability's training code, so in-loop latents equal
    the cached ones and the conditioning equals what the pipeline computes at inference. (The meta
    device, where the benchmarks count FLOPs and memory, has no autocast to turn off.)"""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def mixed_precision_dtype(mode: str) -> torch.dtype | None:
    """The denoiser's autocast dtype for `train.mixed_precision` (None: float32, no autocast)."""
    return torch.bfloat16 if mode == "bf16" else None


def mixed_precision(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The denoiser's autocast for `train.mixed_precision`: bf16 autocast, or nothing for "no"."""
    dtype = mixed_precision_dtype(mode)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
