"""Wan image-to-video (Wan2.1-I2V-14B, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B) as a model family:
`model.family: wan`, options in `wan:`.

The pieces live next to this file, one job each: `pipeline` (the three layouts, loading, the tiny
pipelines), `conditioning` (what the transformer is fed, as the pipeline builds it), `objective`
(rectified flow with shift, timestep densities, expert ranges), `loss` (a batch -> its loss),
`cache` (the latent cache's encoder), `lora` (targets and diffusers' LoRA file), `sampler` (the
real pipeline with the LoRA), `comfy` and `export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from svdray.config import Config, ModelConfig
from svdray.data.buckets import parse_bucket
from svdray.models.base import ModelFamily, TrainingModels, denoiser_device
from svdray.models.float8 import quantize_blocks
from svdray.models.lora import load_lora, save_lora
from svdray.models.precision import mixed_precision_dtype
from svdray.models.speed import apply_speed_options
from svdray.models.wan import loss, sampler
from svdray.models.wan.config import check_context_parallel_heads, check_context_parallel_tokens
from svdray.models.wan.lora import add_wan_lora, save_wan_lora
from svdray.models.wan.pipeline import (
    EXPERTS,
    FULL_SIZE_LAYOUTS,
    LAYOUTS,
    build_full_size_pipeline,
    cast_as_loaded,
    check_num_frames,
    component_dtypes,
    default_num_frames,
    load_expert,
    load_wan_pipeline,
    meta_pipeline,
    save_full_size_pipeline,
    save_tiny_wan_pipeline,
    side_multiple,
)

if TYPE_CHECKING:
    from svdray.data.cache import CacheEncoderSpec


def check_pipeline_shapes(pipe: Any, cfg: Config) -> None:
    """The layout-dependent rules config validation cannot check without the pipeline: frame
    counts follow the VAE's temporal compression, sides its spatial one times the patch size."""
    check_num_frames(cfg.data.num_frames, "data.num_frames", pipe.vae_scale_factor_temporal)
    multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    for key, side in (("data.height", cfg.data.height), ("data.width", cfg.data.width)):
        if side % multiple:
            raise ValueError(
                f"{key}: {side} is not a multiple of {multiple} (this pipeline's VAE x patch size)"
            )
    if cfg.train.context_parallel > 1:
        transformer = getattr(pipe, cfg.wan.expert or "transformer")
        check_context_parallel_heads(transformer.config.num_attention_heads, cfg, "this pipeline")
        frames = (cfg.data.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        p_t, p_h, p_w = transformer.config.patch_size
        sizes = {"data.height/width": (cfg.data.height, cfg.data.width)}
        sizes |= {f"data.buckets[{i}]": parse_bucket(b) for i, b in enumerate(cfg.data.buckets)}
        spatial = pipe.vae_scale_factor_spatial
        tokens = {
            f"{cfg.data.num_frames} frames at {key}": (frames // p_t)
            * (h // spatial // p_h)
            * (w // spatial // p_w)
            for key, (h, w) in sizes.items()
        }
        check_context_parallel_tokens(tokens, cfg)


class WanFamily(ModelFamily):
    name = "wan"
    architectures = tuple(FULL_SIZE_LAYOUTS)
    batch_columns = (
        "video",
        "image",
        "latent_mean",
        "latent_std",
        "prompt_embeds",
        "image_embeds",
        "condition",
    )
    export_formats = ("peft", "merged", "comfy")

    def save_tiny_pipeline(self, out_dir: str | Path, seed: int = 0, **options: Any) -> Path:
        layout = options.pop("layout", None) or "i2v"
        if options:
            raise ValueError(f"tiny-model --family wan: no options {sorted(options)}")
        if layout not in LAYOUTS:
            raise ValueError(f"--layout: {layout!r} is not one of {LAYOUTS}")
        return save_tiny_wan_pipeline(out_dir, layout, seed)

    def build_models(self, cfg: Config, device: torch.device) -> TrainingModels:
        """The pipeline's encoders in `model.frozen_dtype`, the trained expert with float32 LoRA
        weights over frozen weights in `model.denoiser_dtype` (A14B's other expert is not kept:
        `sampling_models` loads it the first time a sample needs it)."""
        m = cfg.model
        pipe = load_wan_pipeline(m.pretrained, m.denoiser_dtype, m.variant, m.revision, m.frozen_dtype)
        return self.training_models(pipe, cfg, device)

    def configured_pipeline(self, cfg: Config, architecture: str | None, device: str) -> Any:
        if architecture:
            pipe = build_full_size_pipeline(architecture, device)
        else:
            pipe = meta_pipeline(cfg.model.pretrained, device)
        for name in EXPERTS:  # as `training_models` drops it (A14B's other expert)
            if name != loss.trained_expert(cfg.wan):
                setattr(pipe, name, None)
        dtypes = component_dtypes(cfg.model.denoiser_dtype, cfg.model.frozen_dtype)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                cast_as_loaded(module, dtypes.get(name, dtypes["default"]))
        return pipe

    def save_full_size_pipeline(self, out_dir: str | Path, architecture: str, weights: bool = True) -> Path:
        return save_full_size_pipeline(out_dir, architecture, weights)

    def training_models(self, pipe: Any, cfg: Config, device: torch.device) -> TrainingModels:
        """`build_models` of a pipeline at hand (loaded, or on the meta device)."""
        check_pipeline_shapes(pipe, cfg)
        for name in ("vae", "text_encoder", "image_encoder"):
            module = getattr(pipe, name)
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        frozen = loss.FrozenWan.from_pipeline(pipe, cfg.wan)
        for name in EXPERTS:  # A14B's other expert (14B weights) is loaded only if a sample needs it
            if name != frozen.expert:
                setattr(pipe, name, None)
        denoiser = self.prepare_transformer(getattr(pipe, frozen.expert), cfg)
        denoiser.to(denoiser_device(cfg, device))
        apply_speed_options(denoiser, pipe.vae, cfg.speed)
        return TrainingModels(denoiser, frozen)

    def prepare_transformer(self, transformer: torch.nn.Module, cfg: Config) -> torch.nn.Module:
        """A loaded transformer as training runs it: frozen, the LoRA in, an fp8 base quantised
        (`model.denoiser_dtype: float8`), every block checkpointed if asked (also what
        benchmarks/memory.py counts, on the meta device)."""
        add_wan_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.feed_forward, cfg.lora.dropout)
        if cfg.model.denoiser_dtype == "float8":
            quantize_blocks(self.blocks(transformer), self.float8_keep)
        if cfg.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        return list(denoiser.blocks)

    def release_encoders(self, models: TrainingModels) -> None:
        """The VAE, UMT5 (11 GB in bf16 for the 14B models) and CLIP go to the CPU: from the
        cache, a step needs only the empty prompt's embedding, encoded once at build time."""
        frozen: loss.FrozenWan = models.frozen
        for name in ("vae", "text_encoder", "image_encoder"):
            module = getattr(frozen.pipe, name)
            if module is not None:
                module.to("cpu")

    def cache_encoder(self) -> CacheEncoderSpec:
        from svdray.models.wan.cache import WAN_CACHE

        return WAN_CACHE

    def training_loss(
        self,
        denoiser: torch.nn.Module,
        frozen: loss.FrozenWan,
        batch: dict[str, Any],
        cfg: Config,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return loss.training_loss(denoiser, frozen, batch, cfg.wan, generator)

    def validation_loss(
        self, denoiser: torch.nn.Module, frozen: loss.FrozenWan, batch: dict[str, Any], cfg: Config, seed: int
    ) -> float:
        return loss.validation_loss(denoiser, frozen, batch, seed=seed)

    def sampling_spec(self, cfg: Config, purpose: str = "sample") -> sampler.WanSamplingSpec:
        return sampler.sampling_spec(cfg, purpose)

    def sampling_models(self, cfg: Config, models: TrainingModels) -> sampler.WanSamplingModels:
        frozen: loss.FrozenWan = models.frozen
        if frozen.pipe.config.boundary_ratio is not None:  # both experts sample: load the other once
            other = next(name for name in EXPERTS if name != frozen.expert)
            if getattr(frozen.pipe, other) is None:
                m = cfg.model
                setattr(
                    frozen.pipe,
                    other,
                    load_expert(m.pretrained, other, m.denoiser_dtype, m.variant, m.revision),
                )
        pipe = sampler.pipeline_for_sampling(frozen.pipe, frozen.expert, models.denoiser)
        autocast = mixed_precision_dtype(cfg.train.mixed_precision)
        return sampler.WanSamplingModels(pipe, autocast, frozen.expert, models.denoiser)

    def load_sampling_models(
        self, cfg: Config, lora_dir: str | Path | None, device: str | torch.device | None = None
    ) -> sampler.WanSamplingModels:
        return sampler.load_sampling_models(cfg, lora_dir, device)

    def sample_video(
        self,
        models: sampler.WanSamplingModels,
        image: np.ndarray | torch.Tensor,
        spec: sampler.WanSamplingSpec,
        clip: torch.Tensor | None = None,
        prompt: str = "",
        seed: int | None = None,
    ) -> np.ndarray:
        return sampler.sample_video(models, image, spec, prompt=prompt, seed=seed)

    def default_num_frames(self, model: ModelConfig) -> int:
        return default_num_frames(model.pretrained, model.revision)

    def side_multiple(self, model: ModelConfig) -> int:
        return side_multiple(model.pretrained, model.revision)

    def describe_conditioning(self, spec: sampler.WanSamplingSpec, clip: torch.Tensor | None) -> str:
        shift = "scheduler's" if spec.shift is None else f"{spec.shift:g}"
        return f"guidance_scale={spec.guidance_scale:g} shift={shift}"

    def describe_reward_sampling(self, spec: sampler.WanSamplingSpec) -> str:
        # sample_frames has images and no prompts: the empty prompt, one transformer call per step.
        shift = "scheduler's" if spec.shift is None else f"{spec.shift:g}"
        return f"empty prompt, no guidance, shift={shift}"

    def sample_frames(
        self,
        models: sampler.WanSamplingModels,
        images: torch.Tensor,
        spec: sampler.WanSamplingSpec,
        generator: torch.Generator,
        grad_steps: int,
    ) -> torch.Tensor:
        return sampler.sample_frames(models, images, spec, generator, grad_steps)

    def save_lora(
        self,
        denoiser: torch.nn.Module,
        cfg: Config,
        out_dir: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """peft's adapter folder (what checkpoints, `svdray sample` and `export` read) with diffusers'
        `pytorch_lora_weights.safetensors` beside it: `WanImageToVideoPipeline.load_lora_weights(out_dir)`
        loads the folder as it is (`load_into_transformer_2=True` for A14B's low-noise expert)."""
        save_lora(denoiser, out_dir, cfg.model.pretrained, state_dict)
        return save_wan_lora(denoiser, out_dir, state_dict)

    def load_lora(self, denoiser: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
        return load_lora(denoiser, lora_dir)

    def export(self, fmt: str, lora_dir: Path, out: Path, model: dict[str, Any], dtype: str) -> Path:
        from svdray.models.wan.export import export_comfy, export_merged

        if fmt == "merged":
            # The expert the LoRA trained, from the run's `wan:` section (A14B's transformer_2).
            return export_merged(lora_dir, model, out, dtype, model.get("options", {}).get("expert"))
        if fmt == "comfy":
            return export_comfy(lora_dir, out)
        return super().export(fmt, lora_dir, out, model, dtype)
