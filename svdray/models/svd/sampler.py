"""SVD's sampler, run on the models training uses: one code path for every video svdray samples.

Validation videos, the sample after training, `svdray sample` and the reward stage all come
through `sample_latents` with a `SamplingSpec` built by `sampling_spec(cfg)` from the training
config, so a sampled video is conditioned exactly as training conditioned the UNet: the same
conditioning functions (`svdray.models.svd.conditioning`), the training fps as a float (SVD's fps - 1
is applied in `added_time_ids`), the training motion-bucket rule and the training crop of the
conditioning image. The loop is diffusers' `StableVideoDiffusionPipeline.__call__` written out
(EulerDiscreteScheduler, classifier-free guidance ramped from min to max over the frames, both
the image embedding and the image latent zeroed in the unconditional branch); tests check that
it gives the pipeline's own output. Written out because the pipeline runs under no_grad (the
reward stage keeps a graph through the last `grad_steps` steps) and runs its encoders under the
caller's autocast (here they always run in their own dtype).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from torch.utils.checkpoint import checkpoint

from svdray.config import Config, ModelConfig
from svdray.data.video import motion_score, to_model_range
from svdray.models.images import conditioning_pixels
from svdray.models.lora import load_lora
from svdray.models.precision import encoder_precision, mixed_precision_dtype
from svdray.models.svd import conditioning as cond
from svdray.models.svd.buckets import motion_bucket_ids
from svdray.models.svd.pipeline import FrozenModels, load_pipeline

logger = logging.getLogger("svdray.sample")

# The bucket a sample uses when training computed buckets from each clip but the conditioning
# image has no clip to compute one from (a still image): SVD's own default.
DEFAULT_MOTION_BUCKET = 127.0


@dataclass(frozen=True)
class SamplingSpec:
    """Everything besides the image that decides a sampled video."""

    num_frames: int
    height: int
    width: int
    fps: float  # the real frame rate the clips were sampled at (the UNet gets fps - 1)
    # A fixed bucket, or None for training's rule: computed from the conditioning clip's motion.
    motion_bucket_id: float | None
    motion_bucket_scale: float = 4.0
    noise_aug_strength: float = 0.02
    min_guidance: float = 1.0
    max_guidance: float = 3.0
    steps: int = 25
    decode_chunk: int = 8
    seed: int = 0

    def bucket_for(self, clip: torch.Tensor | None) -> float:
        """The motion bucket for a video conditioned on `clip`'s first frame ((T, 3, H, W) uint8),
        or on a still image (`clip` None): fixed, or computed from the clip as training did."""
        if self.motion_bucket_id is not None:
            return float(self.motion_bucket_id)
        if clip is None or len(clip) < 2:
            return DEFAULT_MOTION_BUCKET
        motion = torch.tensor([motion_score(clip)], dtype=torch.float64)
        return motion_bucket_ids(motion, torch.tensor([-1.0]), None, self.motion_bucket_scale).item()


def sampling_spec(cfg: Config, purpose: str = "sample") -> SamplingSpec:
    """The sampling spec of a run, from its training config: `sample.*` and `svd.sample.*` where
    set, the data section's fps and size and `svd`'s motion-bucket rule otherwise. `purpose` picks
    the step count and seed: "sample" (the video after training, `svdray sample`), "validate" or
    "reward" (with `reward.*` and `svd.reward.*` overrides)."""
    s, d, svd = cfg.sample, cfg.data, cfg.svd
    bucket = svd.sample.motion_bucket_id if svd.sample.motion_bucket_id is not None else svd.motion_bucket_id
    spec = SamplingSpec(
        num_frames=s.num_frames or d.num_frames,
        height=d.height,
        width=d.width,
        fps=float(s.fps if s.fps is not None else d.fps),
        motion_bucket_id=float(bucket) if bucket is not None else None,
        motion_bucket_scale=svd.motion_bucket_scale,
        noise_aug_strength=svd.sample.noise_aug_strength,
        min_guidance=svd.sample.min_guidance,
        max_guidance=svd.sample.max_guidance,
        steps=s.steps,
        seed=s.seed,
    )
    if purpose == "validate":
        return replace(spec, num_frames=d.num_frames, steps=cfg.validate.steps, seed=cfg.validate.seed)
    if purpose == "reward":
        r, rs = cfg.reward, svd.reward
        overrides = {
            "fps": float(r.fps) if r.fps is not None else None,
            "motion_bucket_id": float(rs.motion_bucket_id) if rs.motion_bucket_id is not None else None,
            "noise_aug_strength": rs.noise_aug_strength,
            "min_guidance": rs.min_guidance,
            "max_guidance": rs.max_guidance,
        }
        return replace(
            spec,
            num_frames=r.num_frames or d.num_frames,
            steps=r.sample_steps,
            decode_chunk=r.decode_chunk,
            seed=r.seed,
            **{key: value for key, value in overrides.items() if value is not None},
        )
    if purpose != "sample":
        raise ValueError(f"sampling_spec: unknown purpose {purpose!r}")
    return spec


def sample_latents(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    scheduler_config: dict,
    images: torch.Tensor,
    spec: SamplingSpec,
    generator: torch.Generator,
    motion_buckets: torch.Tensor | None = None,
    grad_steps: int = 0,
) -> torch.Tensor:
    """Video latents (B, T, C, h, w) sampled from conditioning images (B, 3, H, W) in [-1, 1].

    `motion_buckets` (B,) overrides the spec's bucket per image (e.g. computed from each clip).
    The last `grad_steps` denoising steps keep their autograd graph (when grad is enabled); the
    others run without one, so memory is bounded by `grad_steps`, not by the step count.
    Random draws, in the pipeline's order: the conditioning image's noise, then the latents."""
    batch, device = images.shape[0], images.device
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(spec.steps, device=device)
    with torch.no_grad():
        embeddings = cond.clip_image_embeddings(frozen.image_encoder, frozen.feature_extractor, images)
        strength = torch.full((batch,), spec.noise_aug_strength, device=device)
        image_latent = cond.conditioning_latents(frozen.vae, images, strength, generator)
        if motion_buckets is None:
            motion_buckets = torch.full((batch,), spec.bucket_for(None), device=device)
        time_ids = cond.added_time_ids(
            torch.full((batch,), spec.fps, device=device), motion_buckets.to(device), strength
        )
    # The UNet is fed float32 conditioning, as in training (under the caller's autocast, if any).
    embeddings, image_latent = embeddings.float(), image_latent.float()
    guided = spec.max_guidance > 1.0
    if guided:  # the unconditional branch zeroes the embedding and the image latent
        embeddings = torch.cat([torch.zeros_like(embeddings), embeddings])
        image_latent = torch.cat([torch.zeros_like(image_latent), image_latent])
        time_ids = torch.cat([time_ids, time_ids])
    image_latent = image_latent.unsqueeze(1).expand(-1, spec.num_frames, -1, -1, -1)
    guidance = torch.linspace(spec.min_guidance, spec.max_guidance, spec.num_frames, device=device)
    guidance = guidance.view(1, -1, 1, 1, 1)

    factor = 2 ** (len(frozen.vae.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
    shape = (
        batch,
        spec.num_frames,
        frozen.vae.config.latent_channels,
        images.shape[-2] // factor,
        images.shape[-1] // factor,
    )
    latents = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma

    first_grad_step = spec.steps - grad_steps
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latent], dim=2)
            v_pred = unet(model_input, t, encoder_hidden_states=embeddings, added_time_ids=time_ids).sample
            if guided:
                uncond, conditional = v_pred.float().chunk(2)
                v_pred = uncond + guidance * (conditional - uncond)
            latents = scheduler.step(v_pred.float(), t, latents).prev_sample
    return latents


def decode_frames(frozen: FrozenModels, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """Latents (B, T, C, h, w) -> frames (B, T, 3, H, W) in about [-1, 1], differentiably.

    Chunks of frames go through the temporal decoder one at a time (never mixing two videos),
    each under activation checkpointing when a graph is kept, so memory does not grow with T.
    The VAE runs in its own dtype with autocast off, like the encoders."""
    scaled = (latents / frozen.scaling_factor).to(frozen.vae.dtype)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return frozen.vae.decode(z, num_frames=z.shape[0]).sample

    videos = []
    with encoder_precision(latents.device):
        for video in scaled:
            pieces = []
            for start in range(0, video.shape[0], chunk):
                z = video[start : start + chunk]
                pieces.append(checkpoint(decode, z, use_reentrant=False) if z.requires_grad else decode(z))
            videos.append(torch.cat(pieces))
    return torch.stack(videos).float()


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8, as the pipeline's "np" output times 255."""
    pixels = (frames / 2 + 0.5).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class SamplingModels:
    """What sampling runs on: the UNet (with its LoRA), the frozen encoders, the scheduler's
    config, and the UNet's autocast dtype (training's mixed precision, or a half-precision
    pipeline's dtype; None runs it as it is)."""

    unet: torch.nn.Module
    frozen: FrozenModels
    scheduler_config: dict
    autocast_dtype: torch.dtype | None = None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def load_sampling_models(
    model: ModelConfig,
    lora_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    mixed_precision: str = "no",
) -> SamplingModels:
    """The pipeline of a `model` section, loaded as training loads it (variant, revision, frozen
    encoders in `model.frozen_dtype`, a float32 UNet under `mixed_precision` autocast), with a
    trained LoRA; every module in eval mode."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(model.pretrained, "float32", model.variant, model.revision)
    if lora_dir:
        load_lora(pipe.unet, lora_dir)
    pipe.unet.requires_grad_(False).eval().to(device)
    return SamplingModels(
        pipe.unet,
        FrozenModels.from_pipeline(pipe, device, model.frozen_dtype),
        dict(pipe.scheduler.config),
        mixed_precision_dtype(mixed_precision),
    )


@torch.no_grad()
def sample_video(
    models: SamplingModels,
    image: np.ndarray | torch.Tensor,
    spec: SamplingSpec,
    clip: torch.Tensor | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames conditioned on `image` (uint8, any size: cropped like training).

    `clip` ((T, 3, H, W) uint8), when the image is a clip's first frame, lets a computed motion
    bucket follow training's rule; `seed` defaults to the spec's. The UNet is put in eval mode
    (LoRA dropout must not act at inference); the caller puts it back in training mode."""
    models.unet.eval()
    device = next(models.unet.parameters()).device
    pixels = to_model_range(conditioning_pixels(image, spec).to(device)).unsqueeze(0)
    generator = torch.Generator(device).manual_seed(spec.seed if seed is None else seed)
    buckets = torch.tensor([spec.bucket_for(clip)], device=device)
    with models.autocast(device):
        latents = sample_latents(
            models.unet, models.frozen, models.scheduler_config, pixels, spec, generator, buckets
        )
    return to_uint8_frames(decode_frames(models.frozen, latents, spec.decode_chunk)[0])


def sample_frames(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    scheduler_config: dict,
    images: torch.Tensor,
    spec: SamplingSpec,
    generator: torch.Generator,
    grad_steps: int = 0,
) -> torch.Tensor:
    """Frames (B, T, 3, H, W) in about [-1, 1] from images in [-1, 1], with a graph through the
    last `grad_steps` steps and the decoder (the reward stage)."""
    latents = sample_latents(unet, frozen, scheduler_config, images, spec, generator, grad_steps=grad_steps)
    return decode_frames(frozen, latents, spec.decode_chunk)
