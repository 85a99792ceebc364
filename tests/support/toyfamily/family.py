"""The toy family's models: a tiny denoiser of pixel patches conditioned on the first frame,
trained by rectified flow (noisy = (1 - s) x0 + s eps, target eps - x0) and sampled by Euler steps."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from svdray.config import Config, ModelConfig
from svdray.data.cache import CacheEncoderSpec
from svdray.data.video import to_model_range
from svdray.models.base import ModelFamily, TrainingModels
from svdray.models.images import conditioning_pixels
from svdray.models.lora import inject_lora, load_lora, save_lora
from tests.support.toyfamily.config import PATCH

CONFIG = "config.json"
WEIGHTS = "denoiser.safetensors"


def patchify(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T * N, 3 * PATCH^2) tokens."""
    b, t, c, h, w = frames.shape
    x = frames.reshape(b, t, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, t * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpatchify(tokens: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // PATCH, w // PATCH, 3, PATCH, PATCH)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, t, 3, h, w)


class ToyDenoiser(torch.nn.Module):
    """Velocity of noisy frames given the clean first frame and the noise level: one attention
    block over all patches of the clip, its projections named as diffusers names them."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        dim = 3 * PATCH * PATCH
        self.hidden = hidden
        self.proj_in = torch.nn.Linear(2 * dim + 1, hidden)
        self.to_q = torch.nn.Linear(hidden, hidden)
        self.to_k = torch.nn.Linear(hidden, hidden)
        self.to_v = torch.nn.Linear(hidden, hidden)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(hidden, hidden))
        self.proj_out = torch.nn.Linear(hidden, dim)

    def forward(self, noisy: torch.Tensor, image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = noisy.shape
        tokens = patchify(noisy)
        condition = patchify(image.unsqueeze(1)).repeat(1, t, 1)
        level = sigma.view(b, 1, 1).expand(b, tokens.shape[1], 1)
        x = self.proj_in(torch.cat([tokens, condition, level], dim=-1))
        x = x + self.to_out(F.scaled_dot_product_attention(self.to_q(x), self.to_k(x), self.to_v(x)))
        return unpatchify(self.proj_out(x), t, h, w)


def save_denoiser(denoiser: ToyDenoiser, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG).write_text(json.dumps({"hidden": denoiser.hidden}))
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, str(out_dir / WEIGHTS))
    return out_dir


def load_denoiser(pretrained: str | Path) -> ToyDenoiser:
    denoiser = ToyDenoiser(**json.loads((Path(pretrained) / CONFIG).read_text()))
    denoiser.load_state_dict(load_file(str(Path(pretrained) / WEIGHTS)))
    return denoiser


def clean_frames(batch: dict[str, Any]) -> torch.Tensor:
    """The clip in [-1, 1]: the cache's copy when the batch comes from the latent cache."""
    return batch["clean"].float() if "clean" in batch else to_model_range(batch["video"])


def flow_loss(
    denoiser: torch.nn.Module, x0: torch.Tensor, image: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    velocity = denoiser((1 - s) * x0 + s * noise, image, sigma)
    return ((velocity - (noise - x0)) ** 2).flatten(1).mean(1)


class ToyCacheEncoder:
    """The latent cache's encoder: the toy works in pixels, so it stores the clip in [-1, 1]."""

    def __init__(self, model: ModelConfig):
        self.model = model

    def encode(
        self, videos: torch.Tensor, images: torch.Tensor, prompts: list[str]
    ) -> dict[str, torch.Tensor]:
        return {"clean": to_model_range(videos)}


@dataclass(frozen=True)
class ToySamplingSpec:
    num_frames: int
    height: int
    width: int
    fps: float
    steps: int
    seed: int


class ToyFamily(ModelFamily):
    name = "toy"
    batch_columns = ("video", "image", "clean")
    export_formats = ("peft",)

    def save_tiny_pipeline(self, out_dir: str | Path, seed: int = 0, **options: Any) -> Path:
        torch.manual_seed(seed)
        return save_denoiser(ToyDenoiser(**options), out_dir)

    def build_models(self, cfg: Config, device: torch.device) -> TrainingModels:
        denoiser = load_denoiser(cfg.model.pretrained)
        lora = peft.LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )
        return TrainingModels(inject_lora(denoiser, lora).to(device), frozen=None)

    def cache_encoder(self) -> CacheEncoderSpec:
        return CacheEncoderSpec(ToyCacheEncoder, components=(), version="toy-1")

    def training_loss(
        self,
        denoiser: torch.nn.Module,
        frozen: Any,
        batch: dict[str, Any],
        cfg: Config,
        generator: torch.Generator,
    ) -> torch.Tensor:
        x0 = clean_frames(batch)
        sigma = torch.rand(x0.shape[0], generator=generator, device=x0.device) * cfg.toy.max_sigma
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return flow_loss(denoiser, x0, to_model_range(batch["image"]), sigma, noise).mean()

    @torch.no_grad()
    def validation_loss(
        self, denoiser: torch.nn.Module, frozen: Any, batch: dict[str, Any], cfg: Config, seed: int
    ) -> float:
        x0 = clean_frames(batch)
        generator = torch.Generator(x0.device).manual_seed(seed)
        losses = []
        for point in range(4):  # the mid-points of (0, max_sigma]
            sigma = torch.full((x0.shape[0],), (point + 0.5) / 4 * cfg.toy.max_sigma, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            losses.append(flow_loss(denoiser, x0, to_model_range(batch["image"]), sigma, noise).mean())
        return torch.stack(losses).mean().item()

    def sampling_spec(self, cfg: Config, purpose: str = "sample") -> ToySamplingSpec:
        s, d = cfg.sample, cfg.data
        spec = ToySamplingSpec(
            s.num_frames or d.num_frames, d.height, d.width, s.fps or d.fps, s.steps, s.seed
        )
        if purpose == "validate":
            return replace(spec, num_frames=d.num_frames, steps=cfg.validate.steps, seed=cfg.validate.seed)
        return spec

    def sampling_models(self, cfg: Config, models: TrainingModels) -> torch.nn.Module:
        return getattr(models.denoiser, "module", models.denoiser)

    def load_sampling_models(
        self, cfg: Config, lora_dir: str | Path | None, device: str | torch.device | None = None
    ) -> torch.nn.Module:
        denoiser = load_denoiser(cfg.model.pretrained)
        if lora_dir:
            load_lora(denoiser, lora_dir)
        return denoiser.requires_grad_(False).eval().to(device or "cpu")

    @torch.no_grad()
    def sample_video(
        self,
        models: torch.nn.Module,
        image: np.ndarray | torch.Tensor,
        spec: ToySamplingSpec,
        clip: torch.Tensor | None = None,
        prompt: str = "",
        seed: int | None = None,
    ) -> np.ndarray:
        """Euler steps of the flow from noise (sigma 1) to the clip (sigma 0)."""
        device = next(models.parameters()).device
        condition = to_model_range(conditioning_pixels(image, spec).to(device)).unsqueeze(0)
        generator = torch.Generator(device).manual_seed(spec.seed if seed is None else seed)
        x = torch.randn((1, spec.num_frames, 3, spec.height, spec.width), generator=generator, device=device)
        sigmas = torch.linspace(1.0, 0.0, spec.steps + 1, device=device)
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = x + (following - sigma) * models(x, condition, sigma.expand(1))
        frames = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return frames.permute(0, 2, 3, 1).cpu().numpy()

    def default_num_frames(self, model: ModelConfig) -> int:
        return 4

    def save_lora(
        self,
        denoiser: torch.nn.Module,
        cfg: Config,
        out_dir: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        return save_lora(getattr(denoiser, "module", denoiser), out_dir, cfg.model.pretrained, state_dict)

    def load_lora(self, denoiser: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
        return load_lora(denoiser, lora_dir)
