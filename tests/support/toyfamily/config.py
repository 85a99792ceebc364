"""The toy family's config section (`toy:`) and its rules, as a family's config.py is: no torch."""

from __future__ import annotations

from dataclasses import dataclass

from svdray.config import Config, ConfigError
from svdray.models import FamilyConfig

# The denoiser sees each frame as PATCH x PATCH pixel patches: sides are multiples of it.
PATCH = 16


@dataclass
class ToyConfig:
    # Training noise levels are drawn uniformly from (0, max_sigma]; validation's grid spans it too.
    max_sigma: float = 1.0


class ToyFamilyConfig(FamilyConfig):
    name = "toy"
    section = ToyConfig
    family = "tests.support.toyfamily.family:ToyFamily"

    def check(self, cfg: Config) -> None:
        if not 0.0 < cfg.toy.max_sigma <= 1.0:
            raise ConfigError(f"toy.max_sigma: must be in (0, 1], got {cfg.toy.max_sigma}")
        for key, side in (("data.height", cfg.data.height), ("data.width", cfg.data.width)):
            if side % PATCH:
                raise ConfigError(f"{key}: {side} is not a multiple of {PATCH} (the toy denoiser's patch)")
