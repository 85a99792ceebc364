"""The model-family interface: what a family of image-to-video models gives the trainer.

Everything above the models (the Ray Data stream and its latent cache, the training loop, Tune,
MLflow, checkpoints, the reward stage, exports and the CLI) talks to a family only through a
`ModelFamily`, chosen by `model.family` in the config. A family file owns everything that is
true of its models alone: how they load, which modules LoRA adapts, how a batch becomes model
inputs and conditioning (and what of that the cache may store), its conditioning dropout, its
objective with its own noise/timestep draws, the fixed-grid validation loss, its sampler and the
export formats its users load. Its config section and rules are its `FamilyConfig`
(`svdray.models`), in the same folder; adding a family is that folder and a line in
`svdray.models.FAMILIES` (README.md, Layout, lists what the folder holds).

A batch, as the data layer delivers it (`svdray.data.dataset` / `svdray.data.cache`), is a dict
of tensors with a leading batch dimension:

    video            (B, T, 3, H, W) uint8   decoded clips (absent when read from the cache)
    image            (B, 3, H, W) uint8      the conditioning image (a clip's first frame)
    fps              (B,) float32            the rate the frames were sampled at
    motion           (B,) float64            temporal pixel std of the clip, 0..255 units
    motion_bucket_id (B,) float32            the manifest's per-clip value, -1 when absent
    prompt           list[str]               the manifest's prompt ("" when absent)
    <cache fields>                           what the family's cache encoder stored
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from svdray.models.random_weights import empty_parameters, fill_random

if TYPE_CHECKING:
    from svdray.config import Config, ModelConfig
    from svdray.data.cache import CacheEncoderSpec


@dataclass
class TrainingModels:
    """What the training loop holds: the denoiser LoRA trains (SVD's UNet, Wan's transformer),
    with float32 LoRA weights, and the family's frozen encoders (VAE, image and text encoders)."""

    denoiser: torch.nn.Module
    frozen: Any


def denoiser_device(cfg: Config, device: torch.device) -> torch.device:
    """Where `build_models` leaves the denoiser: on the training device, or on the CPU when
    `train.parallel` shards it. FSDP2 moves it to the device one block at a time as it shards it,
    so a denoiser larger than one GPU is never whole on one."""
    return device if cfg.train.parallel == "ddp" or device.type == "meta" else torch.device("cpu")


@dataclass
class LatentDistribution:
    """Mean and std of the VAE posterior per frame: what the latent cache stores.

    Storing the distribution rather than one sample keeps training exact: a fresh latent is drawn
    every step, as when the VAE runs in the loop.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise


class ModelFamily(ABC):
    """One family of image-to-video models (SVD, Wan, ...). Stateless: methods take the run's
    config; instances are cheap and made by `svdray.models.family_of(cfg)`."""

    name: ClassVar[str]
    # Batch columns the loss reads (tensors moved to the device; the rest stay on the host).
    batch_columns: ClassVar[tuple[str, ...]]
    # `svdray export --format`: what this family's LoRA can be written as.
    export_formats: ClassVar[tuple[str, ...]] = ("peft", "merged")
    # Layers inside `blocks` that keep their dtype under `model.denoiser_dtype: float8` (names
    # containing one of these), besides norms, biases and everything outside the blocks.
    float8_keep: ClassVar[tuple[str, ...]] = ()

    # ---------------------------------------------------------------- loading
    # (The family's config section and its rules are its `FamilyConfig`, in its config.py.)
    @abstractmethod
    def save_tiny_pipeline(self, out_dir: str | Path, seed: int = 0, **options: Any) -> Path:
        """A tiny, randomly initialised pipeline of the real classes, saved with `save_pretrained`
        (the embedded default for the demo and the tests)."""

    @abstractmethod
    def build_models(self, cfg: Config, device: torch.device) -> TrainingModels:
        """Load `model.*`, freeze the encoders, put LoRA on the denoiser (float32 LoRA weights,
        frozen weights in the configured dtype), gradient checkpointing and `speed.*` applied."""

    def release_encoders(self, models: TrainingModels) -> None:  # noqa: B027 - optional hook
        """Move the frozen encoders off the training device. The loop calls it when every step
        reads their outputs from the latent cache (`data.cache`) and no validation runs in the
        loop, the one other use they have there. Default: keep them (SVD's step encodes the
        noise-augmented conditioning image with the VAE even from the cache)."""

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's repeated blocks, in forward order: FSDP2 shards each and gathers one at
        a time (`train.parallel`); an fp8 base stores the weights of their linear layers
        (`model.denoiser_dtype: float8`). What lies outside them (embedders, the head) stays
        with the denoiser itself. None (the default): the family trains replicated only."""
        return []

    # ---------------------------------------------------------------- builders (benchmarks)
    # Named full-size architectures (e.g. "SVD-XT", "Wan2.2-TI2V-5B") these build without a download.
    architectures: ClassVar[tuple[str, ...]] = ()

    def configured_pipeline(self, cfg: Config, architecture: str | None, device: str) -> Any:
        """The pipeline `build_models` loads, from configs alone: the architecture whose configs
        `model.pretrained` holds (a local folder) or the named full-size `architecture`, each
        component in the dtype loading gives it, built on `device` ("meta": no storage), without
        what training would drop."""
        raise NotImplementedError(f"model.family {self.name}: no builder from configs")

    def training_models(self, pipe: Any, cfg: Config, device: torch.device) -> TrainingModels:
        """What `build_models` does once it has loaded the pipeline."""
        raise NotImplementedError(f"model.family {self.name}: no builder from configs")

    def meta_models(self, cfg: Config, architecture: str | None = None) -> TrainingModels:
        """What `build_models(cfg, device)` builds, on the meta device (shapes and dtypes, no storage,
        no weights read) for `configured_pipeline`'s architecture; LoRA, dtypes, gradient
        checkpointing and `speed.*` applied as `build_models` applies them (no `torch.compile`:
        nothing runs on meta). Benchmarks count FLOPs and memory on it (`FakeTensorMode` gives it
        fake storage)."""
        pipe = self.configured_pipeline(cfg, architecture, "meta")
        speed = replace(cfg.speed, compile_denoiser=False)
        return self.training_models(pipe, replace(cfg, speed=speed), torch.device("meta"))

    def random_models(
        self, cfg: Config, device: torch.device, architecture: str | None = None
    ) -> TrainingModels:
        """What `build_models(cfg, device)` builds, with random weights made on `device` instead of
        a checkpoint's (`svdray.models.random_weights`), for `configured_pipeline`'s architecture.
        Only configs are read and nothing is initialised on the CPU, so a 14B model is ready in
        seconds (benchmarks/gpu.py times the step on it)."""
        with empty_parameters():
            pipe = self.configured_pipeline(cfg, architecture, "cpu")
        fill_random([m for m in pipe.components.values() if isinstance(m, torch.nn.Module)], device)
        return self.training_models(pipe, cfg, device)

    def save_full_size_pipeline(self, out_dir: str | Path, architecture: str, weights: bool = True) -> Path:
        """A full-size `architecture` saved as a downloaded pipeline is, with random weights (what
        `build_models` then loads, to time a step without a download), or its configs alone
        (`weights=False`: what `meta_models` reads)."""
        raise NotImplementedError(f"model.family {self.name}: no full-size builder")

    # ---------------------------------------------------------------- data
    @abstractmethod
    def cache_encoder(self) -> CacheEncoderSpec:
        """The Ray Data actor that fills the latent cache with this family's frozen encodings."""

    # ---------------------------------------------------------------- objective
    @abstractmethod
    def training_loss(
        self,
        denoiser: torch.nn.Module,
        frozen: Any,
        batch: dict[str, Any],
        cfg: Config,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The mean loss of one batch, every random draw (noise, timesteps, dropout, augmentation)
        from `generator`, so a restored generator state replays a step exactly."""

    @abstractmethod
    def validation_loss(
        self, denoiser: torch.nn.Module, frozen: Any, batch: dict[str, Any], cfg: Config, seed: int
    ) -> float:
        """The loss at a fixed noise-level grid with fixed noise and no dropout: comparable across
        steps, runs and trials."""

    # ---------------------------------------------------------------- sampling
    @abstractmethod
    def sampling_spec(self, cfg: Config, purpose: str = "sample") -> Any:
        """Everything besides the image that decides a sampled video, from the training config;
        `purpose`: "sample", "validate" or "reward"."""

    @abstractmethod
    def sampling_models(self, cfg: Config, models: TrainingModels) -> Any:
        """The sampler's view of the models being trained (validation videos, the reward stage)."""

    @abstractmethod
    def load_sampling_models(
        self, cfg: Config, lora_dir: str | Path | None, device: str | torch.device | None = None
    ) -> Any:
        """The pipeline of `cfg.model`, loaded as training loads it, with a trained LoRA."""

    @abstractmethod
    def sample_video(
        self,
        models: Any,
        image: np.ndarray | torch.Tensor,
        spec: Any,
        clip: torch.Tensor | None = None,
        prompt: str = "",
        seed: int | None = None,
    ) -> np.ndarray:
        """(T, H, W, 3) uint8 frames conditioned on `image` (uint8, cropped like training);
        `clip` (T, 3, H, W) uint8 when the image is a clip's first frame."""

    # What `svdray sample` needs of a pipeline before it loads (from its configs at most, no weights):
    @abstractmethod
    def default_num_frames(self, model: ModelConfig) -> int:
        """The frame count the pipeline of `model` samples when neither a run nor the user says."""

    def side_multiple(self, model: ModelConfig) -> int:
        """What the sides of a video of the pipeline of `model` must be multiples of."""
        return 8  # the VAE's downsampling, as the config requires of every family

    def describe_conditioning(self, spec: Any, clip: torch.Tensor | None) -> str:
        """One line saying how a sample was conditioned (logged and tagged in MLflow)."""
        return f"fps={spec.fps:g}"

    def sample_frames(
        self, models: Any, images: torch.Tensor, spec: Any, generator: torch.Generator, grad_steps: int
    ) -> torch.Tensor:
        """Frames (B, T, 3, H, W) in about [-1, 1] from images in [-1, 1], keeping a graph
        through the last `grad_steps` steps (the reward stage)."""
        raise NotImplementedError(f"model.family {self.name}: the reward stage is not supported")

    def describe_reward_sampling(self, spec: Any) -> str:
        """One line saying how `sample_frames` samples (the reward stage logs and tags it in
        MLflow): what it conditions on and how it guides, as it really runs."""
        raise NotImplementedError(f"model.family {self.name}: the reward stage is not supported")

    # ---------------------------------------------------------------- LoRA and exports
    @abstractmethod
    def save_lora(
        self,
        denoiser: torch.nn.Module,
        cfg: Config,
        out_dir: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """The LoRA as a folder this family's diffusers pipeline loads. `state_dict`: the
        denoiser's trained parameters by name when it does not hold them whole (a sharded
        model's, gathered by `svdray.train.parallel`); None reads them from `denoiser`."""

    @abstractmethod
    def load_lora(self, denoiser: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
        """Apply a saved LoRA to the denoiser (no leftover or missing key)."""

    def export(self, fmt: str, lora_dir: Path, out: Path, model: dict[str, Any], dtype: str) -> Path:
        """Write the LoRA in format `fmt` (one of `export_formats`, "peft" is handled by the caller).
        For "merged", `model` is the base model's section, with `options`: the run's own section
        of this family (empty when unknown)."""
        raise ValueError(
            f"--format {fmt!r}: model.family {self.name} exports {', '.join(self.export_formats)}"
        )
