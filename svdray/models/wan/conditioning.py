"""What Wan's transformer is conditioned on, built as `WanImageToVideoPipeline` builds it.

Latents are normalised per channel with the VAE's `latents_mean` / `latents_std`; the prompt is
encoded by the pipeline's own `encode_prompt` (UMT5, padded to `max_sequence_length` tokens),
Wan2.1's CLIP image embedding by its `encode_image`, and the image condition as its
`prepare_latents` makes it (mask channels and the zero-padded image latent for 2.1 / A14B, the
image latent alone for TI2V). tests/unit/test_wan.py compares every piece with the real pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from PIL import Image

from svdray.models.base import LatentDistribution
from svdray.models.wan.pipeline import MAX_SEQUENCE_LENGTH, check_num_frames, num_latent_frames


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """(z - latents_mean) / latents_std per channel, in float32: the space the transformer works in."""
    mean, std = _latent_stats(vae, latents)
    return (latents.float() - mean) / std


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> LatentDistribution:
    """Normalised VAE posterior of clips, (B, F, 3, H, W) in [-1, 1] -> mean/std of (B, C, T, h, w).

    The posterior is Gaussian and normalisation is affine, so the normalised posterior has mean
    (mu - m) / s and std sigma / s: the cache stores it and a fresh latent is drawn every step.
    Clips go through the VAE one at a time to bound activation memory at full size.
    """
    _, std_norm = _latent_stats(vae, video)
    means, stds = [], []
    for clip in video:
        dist = vae.encode(clip.permute(1, 0, 2, 3).unsqueeze(0).to(vae.dtype)).latent_dist
        means.append(normalize_latents(vae, dist.mean))
        stds.append(dist.std.float() / std_norm)
    return LatentDistribution(torch.cat(means), torch.cat(stds))


# --------------------------------------------------------------------------- conditioning


@dataclass
class WanConditioning:
    """Everything the transformer receives besides the noisy latents and the timestep.

    prompt_embeds: (B, L, D) UMT5 states, zero-padded to L tokens as the pipeline pads them.
    image_embeds:  (B, N, D_img) CLIP penultimate states ("i2v" only), else None.
    condition:     "i2v"/"a14b": (B, 4 + C, T, h, w), mask channels then the normalised latent
                   of (image, zeros...); "ti2v": (B, C, 1, h, w), the image's normalised latent.
    """

    prompt_embeds: torch.Tensor
    image_embeds: torch.Tensor | None
    condition: torch.Tensor


@torch.no_grad()
def encode_prompts(
    pipe: WanImageToVideoPipeline, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
) -> torch.Tensor:
    """UMT5 embeddings through the pipeline's own text path (cleaning, padding, zeroed tail)."""
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=pipe.text_encoder.device,
    )
    return embeds


def frames_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images (exact for frames decoded from 8-bit video)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


@torch.no_grad()
def encode_clip_images(pipe: WanImageToVideoPipeline, images: torch.Tensor) -> torch.Tensor:
    """CLIP conditioning of Wan2.1 ((B, 3, H, W) in [-1, 1] -> (B, N, D)) via `pipe.encode_image`.

    The images go in as 8-bit PIL images, as a user's image does, so the CLIP processor's resize,
    crop and normalisation are the pipeline's own.
    """
    return pipe.encode_image(frames_to_pil(images), device=images.device)


@torch.no_grad()
def condition_latents(
    vae: AutoencoderKLWan, images: torch.Tensor, num_frames: int, expand_timesteps: bool
) -> torch.Tensor:
    """The image condition, built as `WanImageToVideoPipeline.prepare_latents` builds it.

    images: (B, 3, H, W) in [-1, 1]. For Wan2.1/A14B the VAE encodes the clip
    (image, zeros x (num_frames - 1)) and the 4 mask channels (1 on latent frame 0, 0 after)
    go in front; for TI2V it encodes the image alone. Both use the posterior mode, normalised.
    """
    t_lat = num_latent_frames(num_frames, vae.config.scale_factor_temporal)
    images = images.unsqueeze(2)  # (B, 3, 1, H, W)
    if expand_timesteps:
        clip = images
    else:
        zeros = images.new_zeros(images.shape[0], images.shape[1], num_frames - 1, *images.shape[-2:])
        clip = torch.cat([images, zeros], dim=2)
    latent = normalize_latents(vae, vae.encode(clip.to(vae.dtype)).latent_dist.mode())
    if expand_timesteps:
        return latent
    # One mask channel per frame of a temporal group of the VAE (the pipeline's own layout).
    mask = latent.new_zeros(latent.shape[0], vae.config.scale_factor_temporal, t_lat, *latent.shape[-2:])
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def build_conditioning(
    pipe: WanImageToVideoPipeline,
    images: torch.Tensor,
    num_frames: int,
    prompts: list[str],
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> WanConditioning:
    """Conditioning of videos of `num_frames` frames from their images (B, 3, H, W) in [-1, 1]
    and prompts: the UMT5 prompt embeddings, the CLIP image embeddings (Wan2.1 only: pipelines
    with an image encoder) and the image condition."""
    check_num_frames(num_frames, key="frames")
    image_embeds = encode_clip_images(pipe, images) if pipe.image_encoder is not None else None
    return WanConditioning(
        prompt_embeds=encode_prompts(pipe, prompts, max_sequence_length),
        image_embeds=image_embeds,
        condition=condition_latents(pipe.vae, images, num_frames, pipe.config.expand_timesteps),
    )


def drop_prompts(
    prompt_embeds: torch.Tensor,
    empty_prompt_embeds: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's prompt by the empty prompt with probability p (for guidance).

    The pipeline's unconditional branch encodes the negative prompt, "" by default, so the
    dropped prompt is the encoded empty string (`encode_prompts(pipe, [""])`), not zeros.
    Returns the embeddings and the keep mask (1 kept, 0 dropped).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"wan.prompt_dropout: {p} is not a probability")
    keep = (torch.rand(prompt_embeds.shape[0], generator=generator, device=prompt_embeds.device) >= p).float()
    mixed = torch.where(
        keep.view(-1, 1, 1).bool(),
        prompt_embeds,
        empty_prompt_embeds.to(prompt_embeds).expand_as(prompt_embeds),
    )
    return mixed, keep
