"""Wan's sampler: the real `WanImageToVideoPipeline`, on the transformer being trained or a saved
LoRA, conditioned exactly as training conditioned it.

The same prompt encoding (the pipeline's own, padded to the same 512 tokens), the conditioning
image cropped as training frames are cropped (`svdray.models.images`), the training size and
frame count, and the training shift (`wan.shift`, set on the pipeline's scheduler). Only the
transformer runs under training's autocast (`train.mixed_precision`); the VAE and the encoders
run in their own dtype, as in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline
from PIL import Image

from svdray.config import Config
from svdray.models.images import conditioning_pixels
from svdray.models.lora import load_lora
from svdray.models.precision import mixed_precision_dtype
from svdray.models.wan.pipeline import MAX_SEQUENCE_LENGTH, load_wan_pipeline


@dataclass(frozen=True)
class WanSamplingSpec:
    """Everything besides the image and the prompt that decides a sampled video."""

    num_frames: int
    height: int
    width: int
    fps: float  # the rate training sampled clips at: the sample is written at it
    steps: int
    seed: int
    guidance_scale: float
    guidance_scale_2: float | None  # two-expert pipelines only
    negative_prompt: str
    shift: float | None  # None: the pipeline scheduler's own


def sampling_spec(cfg: Config, purpose: str = "sample") -> WanSamplingSpec:
    """The sampling spec of a run from its training config: `sample.*` and `wan.sample.*` where
    set, the data section's size, frame count and fps otherwise; `purpose` picks the step count
    and seed ("sample", "validate" or "reward")."""
    s, d, w = cfg.sample, cfg.data, cfg.wan
    spec = WanSamplingSpec(
        num_frames=s.num_frames or d.num_frames,
        height=d.height,
        width=d.width,
        fps=float(s.fps if s.fps is not None else d.fps),
        steps=s.steps,
        seed=s.seed,
        guidance_scale=w.sample.guidance_scale,
        guidance_scale_2=w.sample.guidance_scale_2,
        negative_prompt=w.sample.negative_prompt,
        shift=w.shift,
    )
    if purpose == "validate":
        return replace(spec, num_frames=d.num_frames, steps=cfg.validate.steps, seed=cfg.validate.seed)
    if purpose == "reward":
        r = cfg.reward
        fps = float(r.fps) if r.fps is not None else spec.fps
        return replace(
            spec, num_frames=r.num_frames or d.num_frames, steps=r.sample_steps, seed=r.seed, fps=fps
        )
    if purpose != "sample":
        raise ValueError(f"sampling_spec: unknown purpose {purpose!r}")
    return spec


def shifted_scheduler(
    scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler, shift: float | None
) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """A fresh copy of the pipeline's scheduler, with `shift` when given (FlowMatchEuler's
    `shift`, UniPC's `flow_shift`)."""
    if shift is None:
        return type(scheduler).from_config(scheduler.config)
    key = "flow_shift" if isinstance(scheduler, UniPCMultistepScheduler) else "shift"
    return type(scheduler).from_config(scheduler.config, **{key: shift})


@dataclass
class WanSamplingModels:
    """A pipeline whose trained expert carries the LoRA, and the transformer's autocast dtype
    (training's mixed precision; None runs it as it is)."""

    pipe: WanImageToVideoPipeline
    autocast_dtype: torch.dtype | None = None


def rebuilt(pipe: WanImageToVideoPipeline, **components: object) -> WanImageToVideoPipeline:
    """A new pipeline object over `pipe`'s modules (no copy) with `components` replaced."""
    return WanImageToVideoPipeline(
        **{**pipe.components, **components},
        boundary_ratio=pipe.config.boundary_ratio,
        expand_timesteps=pipe.config.expand_timesteps,
    )


def pipeline_for_sampling(
    pipe: WanImageToVideoPipeline, expert: str, denoiser: torch.nn.Module
) -> WanImageToVideoPipeline:
    """A pipeline sharing `pipe`'s modules, with `denoiser` (not a DDP wrapper) as `expert`. The
    other expert of a two-expert pipeline goes to the denoiser's device."""
    denoiser = getattr(denoiser, "module", denoiser)
    device = next(denoiser.parameters()).device
    for name in ("transformer", "transformer_2"):
        other = getattr(pipe, name)
        if other is not None and name != expert:
            other.requires_grad_(False).eval().to(device)
    return rebuilt(pipe, **{expert: denoiser})


def load_sampling_models(
    cfg: Config, lora_dir: str | Path | None = None, device: str | torch.device | None = None
) -> WanSamplingModels:
    """The pipeline of `cfg.model`, loaded as training loads it (transformers in
    `model.denoiser_dtype`, encoders in `model.frozen_dtype`), with a trained LoRA on the
    expert it trained; every module in eval mode."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    m = cfg.model
    pipe = load_wan_pipeline(m.pretrained, m.denoiser_dtype, m.variant, m.revision, m.frozen_dtype)
    expert = cfg.wan.expert or "transformer"
    if lora_dir:
        load_lora(getattr(pipe, expert), lora_dir)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.to(device)
    return WanSamplingModels(pipe, mixed_precision_dtype(cfg.train.mixed_precision))


@contextlib.contextmanager
def autocast_forward(module: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """`module`'s forward under autocast to `dtype` (None: unchanged) while the block runs: the
    transformer computes as in training, while the pipeline's encoders and VAE do not."""
    if dtype is None:
        yield
        return
    device_type = next(module.parameters()).device.type
    module.forward = torch.autocast(device_type, dtype=dtype)(module.forward)
    try:
        yield
    finally:
        del module.forward  # the class's forward again


@torch.no_grad()
def sample_video(
    models: WanSamplingModels,
    image: np.ndarray | torch.Tensor,
    spec: WanSamplingSpec,
    prompt: str = "",
    seed: int | None = None,
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames from `image` (uint8, any size: cropped like training) and `prompt`.
    The transformers are put in eval mode (LoRA dropout must not act at inference); a caller that
    trains puts its own back in training mode."""
    pipe = rebuilt(models.pipe, scheduler=shifted_scheduler(models.pipe.scheduler, spec.shift))
    experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    for expert in experts:
        expert.eval()
    pixels = conditioning_pixels(image, spec)
    generator = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    two_experts = pipe.config.boundary_ratio is not None
    with contextlib.ExitStack() as stack:
        for expert in experts:
            stack.enter_context(autocast_forward(expert, models.autocast_dtype))
        frames = pipe(
            image=Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()),
            prompt=prompt,
            negative_prompt=spec.negative_prompt,
            height=spec.height,
            width=spec.width,
            num_frames=spec.num_frames,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            guidance_scale_2=spec.guidance_scale_2 if two_experts else None,
            generator=generator,
            output_type="np",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).frames[0]
    return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)
