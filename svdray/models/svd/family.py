"""Stable Video Diffusion (SVD, SVD-XT) as a model family: `model.family: svd`, options in `svd:`.

The pieces live next to this file, one job each: `pipeline` (loading, the tiny pipeline, the
frozen encoders), `lora` (which UNet modules adapt), `conditioning` (what the UNet is fed, as the
pipeline computes it), `objective` (EDM v-prediction), `loss` (a batch -> its loss), `buckets`
(the motion-bucket rule), `sampler` (the pipeline's sampling loop), `cache` (the latent cache's
encoder), `checkpointing` and `export`/`comfy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.models.resnet import SpatioTemporalResBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

from svdray.config import Config, ModelConfig
from svdray.models.base import ModelFamily, TrainingModels, denoiser_device
from svdray.models.float8 import quantize_blocks, storage_dtype
from svdray.models.lora import cast_frozen_weights, load_lora, save_lora
from svdray.models.precision import mixed_precision_dtype
from svdray.models.speed import apply_speed_options
from svdray.models.svd import loss, sampler
from svdray.models.svd.buckets import motion_bucket_ids
from svdray.models.svd.checkpointing import enable_checkpointing
from svdray.models.svd.lora import add_lora
from svdray.models.svd.pipeline import (
    ARCHITECTURES,
    FrozenModels,
    build_full_size_pipeline,
    load_pipeline,
    meta_pipeline,
    save_full_size_pipeline,
    save_tiny_pipeline,
    scheduler_config,
    unet_num_frames,
)

if TYPE_CHECKING:
    from svdray.data.cache import CacheEncoderSpec

# The UNet's repeated blocks (see `SVDFamily.blocks`).
UNET_BLOCKS = (SpatioTemporalResBlock, TransformerSpatioTemporalModel)


def with_motion_buckets(batch: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The batch with the `motion_bucket_id` the UNet is conditioned on, by `svd`'s rule."""
    buckets = motion_bucket_ids(
        batch["motion"], batch["motion_bucket_id"], cfg.svd.motion_bucket_id, cfg.svd.motion_bucket_scale
    )
    return {**batch, "motion_bucket_id": buckets.to(batch["image"].device)}


class SVDFamily(ModelFamily):
    name = "svd"
    architectures = ARCHITECTURES
    batch_columns = (
        "video",
        "image",
        "fps",
        "motion",
        "motion_bucket_id",
        "latent_mean",
        "latent_std",
        "image_embedding",
    )
    export_formats = ("peft", "merged", "comfy")
    # The res-blocks' projections of the time embedding (their modulation) and the transformers'
    # time-position embedding stay bf16 under an fp8 base.
    float8_keep = ("time_emb_proj", "time_pos_embed")

    def save_tiny_pipeline(self, out_dir: str | Path, seed: int = 0, **options: Any) -> Path:
        if options:
            raise ValueError(f"tiny-model --family svd: no options {sorted(options)}")
        return save_tiny_pipeline(out_dir, seed)

    def build_models(self, cfg: Config, device: torch.device) -> TrainingModels:
        """Frozen VAE + image encoder in `model.frozen_dtype`, and the UNet with float32 LoRA
        weights, its frozen weights in `model.denoiser_dtype`."""
        pipe = load_pipeline(cfg.model.pretrained, "float32", cfg.model.variant, cfg.model.revision)
        return self.training_models(pipe, cfg, device)

    def configured_pipeline(self, cfg: Config, architecture: str | None, device: str) -> Any:
        # float32, as `build_models` loads it (`training_models` casts)
        if architecture:
            return build_full_size_pipeline(architecture, device)
        return meta_pipeline(cfg.model.pretrained, device)

    def save_full_size_pipeline(self, out_dir: str | Path, architecture: str, weights: bool = True) -> Path:
        return save_full_size_pipeline(out_dir, architecture, weights)

    def training_models(self, pipe: Any, cfg: Config, device: torch.device) -> TrainingModels:
        """`build_models` of a pipeline at hand (loaded, or on the meta device)."""
        frozen = FrozenModels.from_pipeline(pipe, device, cfg.model.frozen_dtype)
        frozen.vae_chunk = cfg.speed.vae_chunk
        unet = add_lora(pipe.unet, cfg.lora)
        cast_frozen_weights(unet, getattr(torch, storage_dtype(cfg.model.denoiser_dtype)))
        if cfg.model.denoiser_dtype == "float8":
            quantize_blocks(self.blocks(unet), self.float8_keep)
        unet.to(denoiser_device(cfg, device))
        enable_checkpointing(unet, cfg.train.gradient_checkpointing)
        apply_speed_options(unet, frozen.vae, cfg.speed)
        return TrainingModels(unet, frozen)

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """Every spatio-temporal res-block and transformer of the UNet's down, mid and up blocks
        (the samplers, the time embedding and conv_in/conv_out stay with the UNet)."""
        return [m for m in denoiser.modules() if isinstance(m, UNET_BLOCKS)]

    def cache_encoder(self) -> CacheEncoderSpec:
        from svdray.models.svd.cache import SVD_CACHE

        return SVD_CACHE

    def training_loss(
        self,
        denoiser: torch.nn.Module,
        frozen: FrozenModels,
        batch: dict[str, Any],
        cfg: Config,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return loss.training_loss(denoiser, frozen, with_motion_buckets(batch, cfg), cfg.svd, generator)

    def validation_loss(
        self, denoiser: torch.nn.Module, frozen: FrozenModels, batch: dict[str, Any], cfg: Config, seed: int
    ) -> float:
        return loss.validation_loss(denoiser, frozen, with_motion_buckets(batch, cfg), seed=seed)

    def sampling_spec(self, cfg: Config, purpose: str = "sample") -> sampler.SamplingSpec:
        return sampler.sampling_spec(cfg, purpose)

    def sampling_models(self, cfg: Config, models: TrainingModels) -> sampler.SamplingModels:
        return sampler.SamplingModels(
            models.denoiser,
            models.frozen,
            scheduler_config(cfg.model.pretrained, cfg.model.revision),
            mixed_precision_dtype(cfg.train.mixed_precision),
        )

    def load_sampling_models(
        self, cfg: Config, lora_dir: str | Path | None, device: str | torch.device | None = None
    ) -> sampler.SamplingModels:
        return sampler.load_sampling_models(cfg.model, lora_dir, device, cfg.train.mixed_precision)

    def sample_video(
        self,
        models: sampler.SamplingModels,
        image: np.ndarray | torch.Tensor,
        spec: sampler.SamplingSpec,
        clip: torch.Tensor | None = None,
        prompt: str = "",
        seed: int | None = None,
    ) -> np.ndarray:
        return sampler.sample_video(models, image, spec, clip=clip, seed=seed)

    def default_num_frames(self, model: ModelConfig) -> int:
        return unet_num_frames(model.pretrained, model.revision)

    def describe_conditioning(self, spec: sampler.SamplingSpec, clip: torch.Tensor | None) -> str:
        return f"fps={spec.fps:g} motion_bucket_id={spec.bucket_for(clip):g}"

    def describe_reward_sampling(self, spec: sampler.SamplingSpec) -> str:
        # sample_frames conditions on still images (no clip: a computed bucket falls back to
        # 127) and guides only when max_guidance > 1, ramped over the frames.
        guidance = (
            f"guidance {spec.min_guidance:g}->{spec.max_guidance:g} over the frames"
            if spec.max_guidance > 1.0
            else "no guidance"
        )
        return (
            f"fps={spec.fps:g} motion_bucket_id={spec.bucket_for(None):g} "
            f"noise_aug_strength={spec.noise_aug_strength:g}, {guidance}"
        )

    def sample_frames(
        self,
        models: sampler.SamplingModels,
        images: torch.Tensor,
        spec: sampler.SamplingSpec,
        generator: torch.Generator,
        grad_steps: int,
    ) -> torch.Tensor:
        return sampler.sample_frames(
            models.unet, models.frozen, models.scheduler_config, images, spec, generator, grad_steps
        )

    def save_lora(
        self,
        denoiser: torch.nn.Module,
        cfg: Config,
        out_dir: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        return save_lora(denoiser, out_dir, cfg.model.pretrained, state_dict)

    def load_lora(self, denoiser: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
        return load_lora(denoiser, lora_dir)

    def export(self, fmt: str, lora_dir: Path, out: Path, model: dict[str, Any], dtype: str) -> Path:
        from svdray.models.svd.export import export_comfy, export_merged

        if fmt == "merged":
            return export_merged(
                lora_dir, model["pretrained"], out, dtype, model.get("variant"), model.get("revision")
            )
        if fmt == "comfy":
            return export_comfy(lora_dir, out)
        return super().export(fmt, lora_dir, out, model, dtype)
