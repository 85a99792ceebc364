"""From the config's `tune` section to Ray Tune: the search space, and each trial's own config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from svdray.config import Config, config_from_dict, set_key

# Keys that change which examples a run sees, in which order: trials that differ in one of
# them cannot share one decoded stream.
DATA_KEYS = (
    "data.",
    "train.seed",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.num_workers",
)


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's param space, keyed by the dotted config keys (also the MLflow param names)."""
    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda args: tune.uniform(*args),
        "loguniform": lambda args: tune.loguniform(*args),
        "randint": lambda args: tune.randint(*args),
    }
    space = {}
    for key, spec in cfg.tune.search_space.items():
        ((dist, args),) = spec.items()
        space[key] = make[dist](args)
    return space


def sweep_name(cfg: Config) -> str:
    return cfg.tune.name or f"{cfg.train.name}-sweep"


def trial_steps(cfg: Config) -> int:
    """Steps a trial runs unless ASHA stops it (ASHA's max_t)."""
    return cfg.tune.max_t or cfg.train.max_steps


def sweep_dir(cfg: Config) -> Path:
    """Where the sweep's own files go (summary, plot, trials' outputs): <output_dir>/<sweep name>."""
    return Path(cfg.output_dir) / sweep_name(cfg)


def trial_config(cfg: Config, params: dict[str, Any], trial_id: str) -> Config:
    """The sweep's config with this trial's values, its own stable run name and output folder.

    The run name `<sweep>-<trial id>` is stable across restarts of the trial, so Ray Train
    resumes the trial from its own checkpoints and MLflow finds the trial's run again.
    """
    tree = cfg.to_dict()
    for key, value in params.items():
        # Tune samples numpy scalars; the config schema wants plain Python values.
        set_key(tree, key, value.item() if hasattr(value, "item") else value)
    tree["train"]["name"] = f"{sweep_name(cfg)}-{trial_id}"
    tree["train"]["max_steps"] = trial_steps(cfg)
    tree["output_dir"] = str(sweep_dir(cfg) / "trials" / trial_id)
    tree["mlflow"]["run_name"] = None
    return config_from_dict(tree, check_files=False)


def shares_data(cfg: Config) -> bool:
    """Whether every trial can read one decoded stream (no searched key changes the data)."""
    return cfg.tune.share_data and not any(key.startswith(DATA_KEYS) for key in cfg.tune.search_space)
