"""SVD's part of the latent cache (`svdray.data.cache`): the VAE posterior of every frame and the
CLIP embedding of the clean conditioning image.

No conditioning latent is cached: training adds noise of a per-sample random strength to the
conditioning image in pixel space and encodes the noisy image with the (non-linear) VAE, so the
step encodes that one frame from the cached clean pixels, exactly, at 1/T of the cost of the clip.
The video latent is cached as a distribution (mean, std) and sampled afresh each step.
"""

from __future__ import annotations

import torch

from svdray.config import ModelConfig
from svdray.data.cache import CacheEncoderSpec
from svdray.data.video import to_model_range
from svdray.models.svd import conditioning as cond


class SVDCacheEncoder:
    """The VAE and CLIP image encoder in `model.frozen_dtype`, on the GPU when there is one."""

    def __init__(self, model: ModelConfig):
        from diffusers import AutoencoderKLTemporalDecoder
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, model.frozen_dtype)
        common = dict(revision=model.revision, variant=model.variant, use_safetensors=True)
        self.vae = AutoencoderKLTemporalDecoder.from_pretrained(model.pretrained, subfolder="vae", **common)
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            model.pretrained, subfolder="image_encoder", **common
        )
        self.feature_extractor = CLIPImageProcessor.from_pretrained(
            model.pretrained, subfolder="feature_extractor", revision=model.revision
        )
        for module in (self.vae, self.image_encoder):
            module.requires_grad_(False).eval().to(self.device, dtype)

    @torch.no_grad()
    def encode(
        self, videos: torch.Tensor, images: torch.Tensor, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """uint8 videos (B, T, 3, H, W) and images (B, 3, H, W) -> latent_mean and latent_std
        (B, T, C, h, w) and image_embedding (B, 1, D), float32 on the CPU. SVD has no prompt."""
        video = to_model_range(videos.to(self.device))
        image = to_model_range(images.to(self.device))
        distribution = cond.video_latent_distribution(self.vae, video)
        embedding = cond.clip_image_embeddings(self.image_encoder, self.feature_extractor, image)
        return {
            "latent_mean": distribution.mean.float().cpu(),
            "latent_std": distribution.std.float().cpu(),
            "image_embedding": embedding.float().cpu(),
        }


SVD_CACHE = CacheEncoderSpec(SVDCacheEncoder, ("vae", "image_encoder", "feature_extractor"), "svd-1")
