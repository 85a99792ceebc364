"""SVD sampling that keeps the autograd graph through the last K denoising steps only.

This is the pipeline's own sampler (EulerDiscreteScheduler, the same conditioning, classifier-free
guidance ramped from min to max over the frames) unrolled by hand, because the pipeline runs under
no_grad. Steps before the last K run without a graph, so memory is bounded by K (and by gradient
checkpointing inside the UNet and the VAE decoder), not by the number of sampling steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import EulerDiscreteScheduler
from torch.utils.checkpoint import checkpoint

from svdray.model import conditioning as cond
from svdray.train.step import FrozenModels


@dataclass(frozen=True)
class SamplingSpec:
    num_frames: int
    steps: int = 8
    grad_steps: int = 1  # K: the last K steps keep their graph
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance: float = 1.0
    max_guidance: float = 3.0
    decode_chunk: int = 8


def sample_latents(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    scheduler_config: dict,
    images: torch.Tensor,
    spec: SamplingSpec,
    generator: torch.Generator,
) -> torch.Tensor:
    """Video latents (B, T, C, h, w) sampled from conditioning images in [-1, 1]."""
    batch, device = images.shape[0], images.device
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(spec.steps, device=device)
    with torch.no_grad():
        embeddings = cond.clip_image_embeddings(
            frozen.image_encoder, frozen.feature_extractor, images
        ).float()
        strength = torch.full((batch,), spec.noise_aug_strength, device=device)
        image_latent = cond.conditioning_latents(frozen.vae, images, strength, generator).float()
        time_ids = cond.added_time_ids(
            torch.full((batch,), float(spec.fps), device=device),
            torch.full((batch,), float(spec.motion_bucket_id), device=device),
            strength,
        )
    guided = spec.max_guidance > 1.0
    # The unconditional branch zeroes both the embedding and the image latent, as the pipeline does.
    if guided:
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

    first_grad_step = spec.steps - spec.grad_steps
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= first_grad_step and torch.is_grad_enabled()):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latent], dim=2)
            v_pred = unet(model_input, t, encoder_hidden_states=embeddings, added_time_ids=time_ids).sample
            if guided:
                uncond, conditional = v_pred.chunk(2)
                v_pred = uncond + guidance * (conditional - uncond)
            latents = scheduler.step(v_pred, t, latents).prev_sample
    return latents


def decode_frames(frozen: FrozenModels, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """Latents (B, T, C, h, w) -> frames (B, T, 3, H, W) in about [-1, 1], differentiably.

    Chunks of frames go through the temporal decoder one at a time, each under activation
    checkpointing when a graph is kept, so decoding memory does not grow with T.
    """
    scaled = (latents / frozen.scaling_factor).to(frozen.vae.dtype)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return frozen.vae.decode(z, num_frames=z.shape[0]).sample

    videos = []
    for video in scaled:  # chunks never mix frames of two videos in the temporal decoder
        pieces = []
        for start in range(0, video.shape[0], chunk):
            z = video[start : start + chunk]
            pieces.append(checkpoint(decode, z, use_reentrant=False) if z.requires_grad else decode(z))
        videos.append(torch.cat(pieces))
    return torch.stack(videos).float()


def sample_frames(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    scheduler_config: dict,
    images: torch.Tensor,
    spec: SamplingSpec,
    generator: torch.Generator,
) -> torch.Tensor:
    latents = sample_latents(unet, frozen, scheduler_config, images, spec, generator)
    return decode_frames(frozen, latents, spec.decode_chunk)
