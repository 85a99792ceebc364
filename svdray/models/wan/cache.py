"""Wan's part of the latent cache (`svdray.data.cache`): per clip, the normalised VAE posterior
of its frames, the UMT5 embeddings of its prompt, the image condition and (Wan2.1) the CLIP
embeddings of its conditioning image.

All of Wan's conditioning is deterministic (no noise augmentation, the image latent is the
posterior's mode), so everything but the video latent is cached as it is; the video latent is
cached as a distribution (mean, std) and sampled afresh each step. With the cache, a step runs
no encoder: the image condition of Wan2.1 / A14B alone costs a VAE pass over a whole clip.
"""

from __future__ import annotations

import torch

from svdray.config import ModelConfig
from svdray.data.cache import CacheEncoderSpec
from svdray.models.wan.loss import encode_batch
from svdray.models.wan.pipeline import load_wan_pipeline


class WanCacheEncoder:
    """The pipeline's encoders (no transformer) in `model.frozen_dtype`, on the GPU when there is one."""

    def __init__(self, model: ModelConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_wan_pipeline(
            model.pretrained,
            model.denoiser_dtype,
            model.variant,
            model.revision,
            encoder_dtype=model.frozen_dtype,
            transformers=False,
        )
        for name in ("vae", "text_encoder", "image_encoder"):
            module = getattr(self.pipe, name)
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)

    @torch.no_grad()
    def encode(
        self, videos: torch.Tensor, images: torch.Tensor, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        """uint8 videos (B, T, 3, H, W), images (B, 3, H, W) and B prompts -> latent_mean,
        latent_std (B, C, t, h, w), prompt_embeds (B, L, D), condition and, for Wan2.1,
        image_embeds (B, N, D'), float32 on the CPU."""
        batch = {"video": videos.to(self.device), "image": images.to(self.device), "prompt": prompts}
        distribution, cond = encode_batch(self.pipe, batch)
        fields = {
            "latent_mean": distribution.mean,
            "latent_std": distribution.std,
            "prompt_embeds": cond.prompt_embeds,
            "condition": cond.condition,
        }
        if cond.image_embeds is not None:
            fields["image_embeds"] = cond.image_embeds
        return {name: value.float().cpu() for name, value in fields.items()}


# uses_prompts: an edited caption is a new entry (its UMT5 embeddings change).
WAN_CACHE = CacheEncoderSpec(
    WanCacheEncoder,
    ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"),
    "wan-1",
    uses_prompts=True,
)
