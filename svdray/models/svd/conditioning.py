"""The conditioning SVD's UNet receives, computed exactly as the pipeline computes it at inference.

Training on anything else (fps instead of fps-1, a scaled conditioning latent, CLIP without the
antialiased 224 resize) trains a model the sampler does not drive the way it was trained.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,
)
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from svdray.models.base import LatentDistribution
from svdray.models.precision import encoder_precision


def clip_image_embeddings(
    image_encoder: CLIPVisionModelWithProjection,
    feature_extractor: CLIPImageProcessor,
    images: torch.Tensor,
) -> torch.Tensor:
    """CLIP embedding of conditioning images in [-1, 1], shape (B, 3, H, W) -> (B, 1, D).

    Same steps as `StableVideoDiffusionPipeline._encode_image` for a PIL image: antialiased resize
    to 224 in [-1, 1], back to [0, 1], CLIP mean/std normalisation, `image_embeds` as one token.
    Done in torch so it runs on the training device.
    """
    dtype = next(image_encoder.parameters()).dtype
    with encoder_precision(images.device):
        pixels = _resize_with_antialiasing(images.float(), (224, 224))
        pixels = (pixels + 1.0) / 2.0
        mean = torch.tensor(feature_extractor.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(feature_extractor.image_std, device=pixels.device).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        return image_encoder(pixels.to(dtype)).image_embeds.unsqueeze(1)


def conditioning_latents(
    vae: AutoencoderKLTemporalDecoder,
    images: torch.Tensor,
    noise_aug_strength: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VAE latent of the noise-augmented conditioning image, (B, 3, H, W) -> (B, C, h, w).

    As in the pipeline: Gaussian noise of the per-sample strength is added in pixel space, the
    latent is the distribution's mode, and it is NOT multiplied by the VAE scaling factor.
    """
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noisy = images + noise_aug_strength.view(-1, 1, 1, 1).to(images.dtype) * noise
    with encoder_precision(images.device):
        return vae.encode(noisy.to(vae.dtype)).latent_dist.mode()


def video_latent_distribution(
    vae: AutoencoderKLTemporalDecoder, video: torch.Tensor, chunk_size: int = 16
) -> LatentDistribution:
    """VAE posterior of every frame, (B, T, 3, H, W) in [-1, 1] -> mean/std of (B, T, C, h, w).

    Frames are encoded in chunks to bound activation memory at full resolution.
    """
    batch, frames = video.shape[:2]
    flat = video.flatten(0, 1).to(vae.dtype)
    means, stds = [], []
    with encoder_precision(video.device):
        for chunk in flat.split(chunk_size):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean = torch.cat(means).float()
    std = torch.cat(stds).float()
    return LatentDistribution(mean.unflatten(0, (batch, frames)), std.unflatten(0, (batch, frames)))


def added_time_ids(
    fps: torch.Tensor, motion_bucket_id: torch.Tensor, noise_aug_strength: torch.Tensor
) -> torch.Tensor:
    """[fps - 1, motion_bucket_id, noise_aug_strength] per sample, shape (B, 3).

    SVD was conditioned on fps - 1 and the pipeline subtracts 1 from the fps it is given, so
    training subtracts it too: `fps` here is the clip's real frame rate after sampling.
    """
    return torch.stack([fps.float() - 1.0, motion_bucket_id.float(), noise_aug_strength.float()], dim=1)


def sample_noise_aug_strength(
    batch: int,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample conditioning noise strength ~ LogNormal(mean, std) (one per sample, not per batch)."""
    return torch.exp(mean + std * torch.randn(batch, generator=generator, device=device))


def cfg_dropout_masks(
    batch: int, p: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (1 keep, 0 drop) for the CLIP embedding and the conditioning latent.

    InstructPix2Pix scheme with r ~ U(0, 1): the embedding is dropped when r < 2p, the latent
    when p <= r < 3p, so each is dropped with probability 2p and both together with p, which is
    the unconditional branch the sampler's guidance uses (both zeroed).
    """
    r = torch.rand(batch, generator=generator, device=device)
    keep_embedding = (r >= 2 * p).float()
    keep_latent = ((r < p) | (r >= 3 * p)).float()
    return keep_embedding, keep_latent
