"""The model-family registry: `model.family` -> the family's config section and its `ModelFamily`.

A family is one folder, `svdray/models/<family>/`: its `config.py` (its config section's
dataclasses and rules, and a `FamilyConfig` naming them; no torch) and its `family.py` (the
`ModelFamily` the trainer talks to; `svdray.models.base`). `FAMILIES` names each built-in one by
the import path of its `FamilyConfig`. A family defined anywhere else is named by that path in the
config itself, `model.family: "package.module:FamilyConfigClass"` (its section key is the
`FamilyConfig`'s `name`): every process that reads the config (the driver, each Ray worker, a
Tune trial) finds the family by importing it, so nothing has to be registered in each of them.

The family's own modules are imported on first use: diffusers and transformers take seconds to
import, and the config, the CLI's argument checks and the data workers need none of them. This
module imports neither torch nor diffusers.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from svdray.config import Config
    from svdray.models.base import ModelFamily

# model.family -> "module:FamilyConfig class" (the built-in families; a third one is a line here)
FAMILIES = {
    "svd": "svdray.models.svd.config:SvdFamilyConfig",
    "wan": "svdray.models.wan.config:WanFamilyConfig",
}


class SampleFlag(NamedTuple):
    key: str  # the config key it sets, e.g. "svd.sample.motion_bucket_id"
    type: type
    help: str


class FamilyConfig:
    """A model family as the config sees it: its section and its rules, without importing the
    family itself (no torch, no diffusers, so validating a config stays instant)."""

    name: ClassVar[str]  # the family's name and its section's key (`svd:`)
    section: ClassVar[type]  # the section's dataclass; its defaults mean "not set"
    family: ClassVar[str]  # "module:Class" of its `ModelFamily`, imported on first use
    # `svdray sample`'s options of this family: flag (`motion_bucket_id` is --motion-bucket-id)
    # -> the key of its section it sets, its type and its help.
    sample_flags: ClassVar[dict[str, SampleFlag]] = {}
    # `svdray tiny-model --layout`: the layouts of its tiny pipeline ("" when it has one).
    layouts: ClassVar[str] = ""
    # Whether its denoiser can split a clip over workers (`train.context_parallel`): it declares
    # diffusers' context-parallel plan (`_cp_plan`).
    context_parallel: ClassVar[bool] = False

    def check(self, cfg: Config) -> None:
        """The family's rules on a whole config of this family (raise `ConfigError` naming the
        key). Rules that need the pipeline are checked when it loads, naming the same keys."""


def _import(path: str, what: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}: cannot import {path!r} ({err})") from None


@functools.cache
def family_config(family: str) -> FamilyConfig:
    """The `FamilyConfig` of a `model.family` value: a name in `FAMILIES`, or an import path."""
    if family in FAMILIES:
        found = _import(FAMILIES[family], "model.family")
    elif isinstance(family, str) and ":" in family:
        found = _import(family, "model.family")
        if getattr(found, "name", None) in FAMILIES:
            raise ValueError(f"model.family: {family!r} is named {found.name!r}, a built-in family's name")
    else:
        raise ValueError(
            f"model.family: {family!r} is not one of {sorted(FAMILIES)} (nor the import path "
            '"package.module:Class" of a FamilyConfig)'
        )
    if not (isinstance(found, type) and issubclass(found, FamilyConfig)):
        raise ValueError(f"model.family: {family!r} is not a FamilyConfig subclass")
    return found()


def registered_families() -> list[FamilyConfig]:
    """The built-in families, in `FAMILIES` order (the order of their config sections)."""
    return [family_config(name) for name in FAMILIES]


def get_family(family: str) -> ModelFamily:
    """The `ModelFamily` of a `model.family` value (imports the family: torch, diffusers)."""
    spec = family_config(family)
    model_family = _import(spec.family, f"model.family {spec.name}")()
    if model_family.name != spec.name:
        raise ValueError(
            f"model.family: {spec.family} is named {model_family.name!r}, its config {spec.name!r}"
        )
    return model_family


def family_of(cfg: Config) -> ModelFamily:
    """The model family of a run's config."""
    return get_family(cfg.model.family)
