"""Model families behind one interface (`svdray.models.base.ModelFamily`), chosen by `model.family`.

Families are imported on first use: diffusers and transformers take seconds to import, and the
config, the CLI's argument checks and the data workers need none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svdray.config import Config
    from svdray.models.base import ModelFamily

# model.family -> "module:class"
FAMILIES = {
    "svd": "svdray.models.svd.family:SVDFamily",
    "wan": "svdray.models.wan.family:WanFamily",
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"model.family: {name!r} is not one of {sorted(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def family_of(cfg: Config) -> ModelFamily:
    """The model family of a run's config."""
    return get_family(cfg.model.family)
