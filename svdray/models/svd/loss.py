"""One training example batch -> loss: frozen encoders, conditioning, EDM v-prediction loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdray.data.video import to_model_range
from svdray.models.base import LatentDistribution
from svdray.models.svd import conditioning as cond
from svdray.models.svd.config import SvdConfig
from svdray.models.svd.objective import add_noise, predict_v, sample_sigmas, v_loss, v_target
from svdray.models.svd.pipeline import FrozenModels


@dataclass
class EncodedBatch:
    """What the UNet is trained on: clean video latents and the pipeline's conditioning."""

    latents: torch.Tensor  # (B, T, C, h, w), already times the VAE scaling factor
    condition_latent: torch.Tensor  # (B, C, h, w), noise-augmented image latent (mode, unscaled)
    image_embeddings: torch.Tensor  # (B, 1, D)
    time_ids: torch.Tensor  # (B, 3): fps - 1, motion bucket, noise strength


@torch.no_grad()
def encode_batch(
    frozen: FrozenModels,
    batch: dict[str, torch.Tensor],
    noise_aug_strength: torch.Tensor,
    generator: torch.Generator | None,
) -> EncodedBatch:
    """Latents and conditioning of a batch of decoded clips, or of cached ones.

    A cached batch (`svdray.data.cache`) brings the VAE posterior of its frames and the CLIP
    embedding of its clean conditioning image, so neither the VAE on the T frames nor CLIP runs.
    The conditioning latent is still encoded here, from the cached clean pixels: its noise is
    added in pixel space before the (non-linear) VAE encoder, so it cannot be cached exactly.
    Both paths draw from `generator` in the same order and give the same result.
    """
    image = to_model_range(batch["image"])
    if "latent_mean" in batch:
        distribution = LatentDistribution(batch["latent_mean"].float(), batch["latent_std"].float())
    else:
        distribution = cond.video_latent_distribution(
            frozen.vae, to_model_range(batch["video"]), frozen.vae_chunk
        )
    latents = distribution.sample(generator) * frozen.scaling_factor
    condition_latent = cond.conditioning_latents(frozen.vae, image, noise_aug_strength, generator).float()
    if "image_embedding" in batch:
        embeddings = batch["image_embedding"].float()
    else:
        embeddings = cond.clip_image_embeddings(frozen.image_encoder, frozen.feature_extractor, image).float()
    return EncodedBatch(
        latents=latents,
        condition_latent=condition_latent,
        image_embeddings=embeddings,
        time_ids=cond.added_time_ids(batch["fps"], batch["motion_bucket_id"], noise_aug_strength),
    )


def apply_cfg_dropout(encoded: EncodedBatch, p: float, generator: torch.Generator | None) -> EncodedBatch:
    keep_embedding, keep_latent = cond.cfg_dropout_masks(
        encoded.latents.shape[0], p, generator, encoded.latents.device
    )
    return EncodedBatch(
        latents=encoded.latents,
        condition_latent=encoded.condition_latent * keep_latent.view(-1, 1, 1, 1),
        image_embeddings=encoded.image_embeddings * keep_embedding.view(-1, 1, 1),
        time_ids=encoded.time_ids,
    )


def diffusion_loss(
    unet: torch.nn.Module,
    encoded: EncodedBatch,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample v-prediction MSE at the given sigmas and noise."""
    noisy = add_noise(encoded.latents, noise, sigma)
    v_pred = predict_v(
        unet, noisy, sigma, encoded.condition_latent, encoded.image_embeddings, encoded.time_ids
    )
    return v_loss(v_pred, v_target(encoded.latents, noise, sigma))


def training_loss(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    batch: dict[str, torch.Tensor],
    cfg: SvdConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The mean loss of one batch, with fresh sigmas, noise, noise augmentation and CFG dropout."""
    size = batch["image"].shape[0]
    device = batch["image"].device
    strength = cond.sample_noise_aug_strength(size, cfg.noise_aug_mean, cfg.noise_aug_std, generator, device)
    encoded = apply_cfg_dropout(encode_batch(frozen, batch, strength, generator), cfg.cfg_dropout, generator)
    sigma = sample_sigmas(size, cfg.p_mean, cfg.p_std, generator, device)
    noise = torch.randn(encoded.latents.shape, generator=generator, device=device)
    return diffusion_loss(unet, encoded, sigma, noise).mean()


# A fixed grid spanning the training distribution's bulk (LogNormal(0.7, 1.6) quantiles ~5%..95%).
VALIDATION_SIGMAS = (0.15, 0.5, 1.0, 2.0, 5.0, 15.0)


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    frozen: FrozenModels,
    batch: dict[str, torch.Tensor],
    seed: int = 0,
    sigmas: tuple[float, ...] = VALIDATION_SIGMAS,
    noise_aug_strength: float = 0.02,
) -> float:
    """Mean loss over a fixed sigma grid with fixed noise and no dropout: comparable across
    steps, runs and trials, unlike the training loss, which is dominated by the sigmas drawn."""
    device = batch["image"].device
    generator = torch.Generator(device).manual_seed(seed)
    size = batch["image"].shape[0]
    strength = torch.full((size,), noise_aug_strength, device=device)
    encoded = encode_batch(frozen, batch, strength, generator)
    losses = []
    for sigma_value in sigmas:
        sigma = torch.full((size,), sigma_value, device=device)
        noise = torch.randn(encoded.latents.shape, generator=generator, device=device)
        losses.append(diffusion_loss(unet, encoded, sigma, noise).mean())
    return torch.stack(losses).mean().item()
