"""Differentiable rewards on sampled videos, each declaring the pixel range it expects.

Every reward receives frames (B, T, 3, H, W) and the conditioning image (B, 3, H, W) in its
declared `input_range` and returns one score per sample (B,), higher is better. Declaring the
range is what lets the diagnostics catch the classic silent failure: a reward written for [0, 1]
pixels fed decoded frames in [-1, 1] (half of everything clamps to zero).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class Reward(torch.nn.Module):
    name: str = "reward"
    input_range: tuple[float, float] = (0.0, 1.0)

    def forward(self, frames: torch.Tensor, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ConditioningFidelity(Reward):
    """The first frames should show the conditioning image: -MSE of frames[:k] against it."""

    name = "fidelity"

    def __init__(self, num_frames: int = 2):
        super().__init__()
        self.num_frames = num_frames

    def forward(self, frames: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        early = frames[:, : self.num_frames]
        return -((early - image.unsqueeze(1)) ** 2).flatten(1).mean(dim=1)


class TemporalSmoothness(Reward):
    """Penalises flicker, not motion: the second temporal difference is zero for steady motion
    and large for frames that jump back and forth."""

    name = "smoothness"

    def forward(self, frames: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] < 3:
            raise ValueError("smoothness reward needs at least 3 frames")
        second = frames[:, 2:] - 2 * frames[:, 1:-1] + frames[:, :-2]
        return -(second**2).flatten(1).mean(dim=1)


class MotionTarget(Reward):
    """Keeps the amount of motion near a target (mean absolute frame difference in [0, 1] pixel
    units), so fine-tuning for smoothness or fidelity cannot buy its reward by freezing the video."""

    name = "motion"

    def __init__(self, target: float = 0.05):
        super().__init__()
        if target <= 0:
            raise ValueError("motion target must be positive")
        self.target = target

    def forward(self, frames: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        motion = (frames[:, 1:] - frames[:, :-1]).abs().flatten(1).mean(dim=1)
        return -(((motion - self.target) / self.target) ** 2)


class LearnedScorer(Reward):
    """A learned scorer loaded from a local folder: a CLIP vision tower plus a linear head, the
    architecture of the LAION aesthetic predictor.

    Folder layout (no pickles):
        scorer_config.json   {"input_range": [0, 1], "image_size": 224, "mean": [...], "std": [...],
                              "frames": "all" | "middle"}
        clip/                a transformers CLIPVisionModelWithProjection (save_pretrained)
        head.safetensors     {"weight": (1, D), "bias": (1,)}
    The scorer's weights are frozen; gradients flow through it to the video.
    """

    name = "learned"

    def __init__(self, path: str | Path):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        path = Path(path)
        config_file = path / "scorer_config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file}: learned scorer folder has no scorer_config.json")
        config = json.loads(config_file.read_text())
        self.input_range = tuple(config.get("input_range", (0.0, 1.0)))
        self.image_size = int(config.get("image_size", 224))
        self.frames = config.get("frames", "all")
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(str(path / "clip"), use_safetensors=True)
        head = load_file(str(path / "head.safetensors"))
        self.head = torch.nn.Linear(head["weight"].shape[1], 1)
        self.head.load_state_dict(head)
        self.requires_grad_(False).eval()

    def forward(self, frames: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if self.frames == "middle":
            frames = frames[:, frames.shape[1] // 2 : frames.shape[1] // 2 + 1]
        batch, count = frames.shape[:2]
        lo, hi = self.input_range
        pixels = (frames.flatten(0, 1) - lo) / (hi - lo)  # to [0, 1] before the scorer's own normalisation
        pixels = F.interpolate(
            pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
        )
        embeds = self.encoder(
            pixel_values=((pixels - self.mean) / self.std).to(self.head.weight.dtype)
        ).image_embeds
        return self.head(embeds).view(batch, count).mean(dim=1)


BUILTIN = {
    "fidelity": ConditioningFidelity,
    "smoothness": TemporalSmoothness,
    "motion": MotionTarget,
    "learned": LearnedScorer,
}


def build_reward(kind: str, options: dict[str, Any]) -> Reward:
    """A built-in reward by name, or any Reward subclass by import path "package.module:Class"."""
    if kind in BUILTIN:
        cls = BUILTIN[kind]
    elif ":" in kind:
        module_name, class_name = kind.split(":", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
    else:
        raise ValueError(f"reward kind {kind!r}: not one of {sorted(BUILTIN)} nor 'module:Class'")
    reward = cls(**options)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward kind {kind!r} does not build a svdray.reward.rewards.Reward")
    return reward


def to_input_range(frames: torch.Tensor, input_range: tuple[float, float]) -> torch.Tensor:
    """Decoded frames in [-1, 1] -> the reward's declared range (clamped: the VAE overshoots)."""
    lo, hi = input_range
    return lo + (frames.clamp(-1, 1) + 1) / 2 * (hi - lo)


class RewardSet(torch.nn.Module):
    """Weighted rewards; each gets the frames converted to its own declared range."""

    def __init__(self, rewards: list[tuple[str, Reward, float]], convert_inputs: bool = True):
        super().__init__()
        self.names = [name for name, _, _ in rewards]
        self.rewards = torch.nn.ModuleList([r for _, r, _ in rewards])
        self.weights = [w for _, _, w in rewards]
        self.convert_inputs = convert_inputs

    def inputs_for(self, reward: Reward, frames: torch.Tensor, image: torch.Tensor):
        if not self.convert_inputs:  # the scorer converts itself (or the config is wrong: diagnostics say so)
            return frames, image
        return to_input_range(frames, reward.input_range), to_input_range(image, reward.input_range)

    def forward(
        self, frames: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total per sample, {name: per-sample score}) from frames and image in [-1, 1]."""
        parts = {}
        for name, reward in zip(self.names, self.rewards, strict=True):
            parts[name] = reward(*self.inputs_for(reward, frames, image))
        total = sum(w * parts[n] for n, w in zip(self.names, self.weights, strict=True))
        return total, parts
