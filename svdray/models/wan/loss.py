"""One batch as the data layer delivers it -> Wan's loss: encode (or read the cache), draw, predict.

A batch holds decoded clips (`video`, `image`, `prompt`) or cached ones (`latent_mean`,
`latent_std`, `prompt_embeds`, `condition` and, for Wan2.1, `image_embeds`; see
`svdray.models.wan.cache`). Both paths give the same latent distribution and conditioning, and
draw from the generator in the same order: latents, prompt dropout, sigmas, noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import WanImageToVideoPipeline

from svdray.data.video import to_model_range
from svdray.models.base import LatentDistribution
from svdray.models.precision import encoder_precision
from svdray.models.wan import objective
from svdray.models.wan.conditioning import (
    WanConditioning,
    build_conditioning,
    drop_prompts,
    encode_prompts,
    encode_video,
)
from svdray.models.wan.config import WanConfig

# Points of the validation loss's fixed sigma grid, evenly spaced over the trained expert's range
# (independent of the training density and shift, so runs that sweep those compare).
VALIDATION_POINTS = 8


@dataclass
class FrozenWan:
    """The pipeline around the transformer being trained (its VAE, text and image encoders,
    tokenizer and scheduler: conditioning goes through the pipeline's own methods), and what the
    objective needs of it."""

    pipe: WanImageToVideoPipeline
    expert: str  # the transformer being trained: "transformer", or A14B's "transformer_2"
    sigma_range: tuple[float, float]  # the sigmas that expert denoises
    shift: float  # `wan.shift`, or the scheduler's
    empty_prompt: torch.Tensor  # (1, L, D): what prompt dropout puts in, the encoded ""

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.pipe.config.expand_timesteps)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    @classmethod
    def from_pipeline(cls, pipe: WanImageToVideoPipeline, cfg: WanConfig) -> FrozenWan:
        sigma_range = objective.expert_sigma_range(pipe.config.boundary_ratio, cfg.expert)
        expert = cfg.expert or "transformer"
        shift = cfg.shift if cfg.shift is not None else objective.scheduler_shift(pipe.scheduler)
        if pipe.text_encoder.device.type == "meta":  # shapes only (UMT5's padding mask reads values)
            empty = torch.empty(1, cfg.max_sequence_length, pipe.text_encoder.config.d_model, device="meta")
        else:
            with encoder_precision(pipe.text_encoder.device):
                empty = encode_prompts(pipe, [""]).float()
        return cls(pipe, expert, sigma_range, shift, empty)


@torch.no_grad()
def encode_batch(
    pipe: WanImageToVideoPipeline, batch: dict[str, Any]
) -> tuple[LatentDistribution, WanConditioning]:
    """The normalised latent distribution of the clips and their conditioning, float32, from the
    cache's fields where the batch has them, else from the pixels and prompts (encoders in their
    own dtype, autocast off)."""
    with encoder_precision(batch["image"].device):
        if "latent_mean" in batch:
            distribution = LatentDistribution(batch["latent_mean"].float(), batch["latent_std"].float())
        else:
            distribution = encode_video(pipe.vae, to_model_range(batch["video"]))
        if "condition" in batch:
            image_embeds = batch.get("image_embeds")
            cond = WanConditioning(batch["prompt_embeds"], image_embeds, batch["condition"])
        else:
            num_frames = batch["video"].shape[1]
            cond = build_conditioning(pipe, to_model_range(batch["image"]), num_frames, list(batch["prompt"]))
    return distribution, WanConditioning(
        prompt_embeds=cond.prompt_embeds.float(),
        image_embeds=cond.image_embeds.float() if cond.image_embeds is not None else None,
        condition=cond.condition.float(),
    )


def training_loss(
    transformer: torch.nn.Module,
    frozen: FrozenWan,
    batch: dict[str, Any],
    cfg: WanConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """The mean loss of one batch: a fresh latent from its distribution, prompt dropout, one sigma
    per sample from the configured density within the expert's range, fresh noise."""
    distribution, cond = encode_batch(frozen.pipe, batch)
    x0 = distribution.sample(generator)
    prompts, _ = drop_prompts(cond.prompt_embeds, frozen.empty_prompt, cfg.prompt_dropout, generator)
    cond = replace(cond, prompt_embeds=prompts)
    sigmas = objective.sample_sigmas(
        x0.shape[0],
        cfg.timestep_density,
        frozen.shift,
        cfg.logit_mean,
        cfg.logit_std,
        frozen.sigma_range,
        generator,
        x0.device,
    )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    losses = objective.training_loss(
        transformer, x0, noise, sigmas, cond, frozen.expand_timesteps, frozen.num_train_timesteps
    )
    return losses.mean()


@torch.no_grad()
def validation_loss(
    transformer: torch.nn.Module,
    frozen: FrozenWan,
    batch: dict[str, Any],
    seed: int = 0,
    points: int = VALIDATION_POINTS,
) -> float:
    """Mean loss over a fixed sigma grid (evenly spaced over the expert's range) with noise fixed
    by `seed` and no prompt dropout: comparable across steps, runs and trials."""
    device = batch["image"].device
    generator = torch.Generator(device).manual_seed(seed)
    distribution, cond = encode_batch(frozen.pipe, batch)
    x0 = distribution.sample(generator)
    grid = objective.grid_sigmas(points, "uniform", 1.0, sigma_range=frozen.sigma_range).to(device)
    losses = []
    for sigma in grid:
        sigmas = sigma.expand(x0.shape[0])
        noise = torch.randn(x0.shape, generator=generator, device=device)
        losses.append(
            objective.training_loss(
                transformer, x0, noise, sigmas, cond, frozen.expand_timesteps, frozen.num_train_timesteps
            ).mean()
        )
    return torch.stack(losses).mean().item()
