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
from svdray.models.precision import encoder_precision, mixed_precision_dtype
from svdray.models.wan.conditioning import WanConditioning, build_conditioning
from svdray.models.wan.objective import expert_for_sigma, scheduler_shift, transformer_inputs
from svdray.models.wan.pipeline import MAX_SEQUENCE_LENGTH, load_wan_pipeline, num_latent_frames


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
    (training's mixed precision; None runs it as it is). `denoiser` is what the reward stage
    calls for that expert (the DDP wrapper, so gradients are all-reduced); None: the pipeline's."""

    pipe: WanImageToVideoPipeline
    autocast_dtype: torch.dtype | None = None
    expert: str = "transformer"
    denoiser: torch.nn.Module | None = None


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
    return WanSamplingModels(pipe, mixed_precision_dtype(cfg.train.mixed_precision), expert)


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


def sample_frames(
    models: WanSamplingModels,
    images: torch.Tensor,
    spec: WanSamplingSpec,
    generator: torch.Generator,
    grad_steps: int = 0,
) -> torch.Tensor:
    """Frames (B, T, 3, H, W) in about [-1, 1] from images (B, 3, H, W) in [-1, 1], keeping a graph
    through the last `grad_steps` denoising steps and the VAE decoder (the reward stage).

    The pipeline's denoising loop written out (it runs under no_grad): its conditioning (the
    reward stage has images, no prompts: the empty prompt, so no guidance), Euler steps of the
    flow-matching ODE on the sigmas of `FlowMatchEulerDiscreteScheduler` with the training shift,
    each step by the expert the pipeline would use, TI2V's clean first frame, and its decoding.
    Runs under the caller's autocast; the encoders and the VAE run in their own dtype."""
    pipe, size, device = models.pipe, images.shape[0], images.device
    with torch.no_grad(), encoder_precision(device):
        cond = build_conditioning(pipe, images, spec.num_frames, [""] * size)
    cond = WanConditioning(
        cond.prompt_embeds.float(),
        cond.image_embeds.float() if cond.image_embeds is not None else None,
        cond.condition.float(),
    )
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    shift = spec.shift if spec.shift is not None else scheduler_shift(pipe.scheduler)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    scheduler.set_timesteps(spec.steps, device=device)
    sigmas = scheduler.sigmas.float()
    shape = (
        size,
        pipe.vae.config.z_dim,
        num_latent_frames(spec.num_frames, pipe.vae_scale_factor_temporal),
        spec.height // pipe.vae_scale_factor_spatial,
        spec.width // pipe.vae_scale_factor_spatial,
    )
    latents = torch.randn(shape, generator=generator, device=device)
    expand = bool(pipe.config.expand_timesteps)
    for i in range(spec.steps):
        name = expert_for_sigma(pipe.config.boundary_ratio, float(sigmas[i]))
        trained = name == models.expert and models.denoiser is not None
        module = models.denoiser if trained else getattr(pipe, name)
        model = getattr(module, "module", module)
        with torch.set_grad_enabled(i >= spec.steps - grad_steps and torch.is_grad_enabled()):
            inputs = transformer_inputs(
                latents,
                sigmas[i].expand(size),
                cond,
                expand,
                tuple(model.config.patch_size),
                num_train_timesteps,
                model.dtype,
            )
            velocity = module(**inputs, return_dict=False)[0].float()
            latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
    if expand:  # the pipeline's output keeps the clean image latent in frame 0
        latents = torch.cat([cond.condition, latents[:, :, 1:]], dim=2)
    return decode_latents(pipe.vae, latents)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, t, h, w) -> frames (B, T, 3, H, W) in about [-1, 1], float32, as
    the pipeline decodes them (VAE in its own dtype, autocast off; differentiable)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
    with encoder_precision(latents.device):
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
    return video.float().permute(0, 2, 1, 3, 4)
