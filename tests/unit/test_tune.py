"""Sweeps: the config's tune section, its errors naming the key, and each trial's config
(tests/integration/test_tune.py runs a real ASHA sweep as a Ray job)."""

from __future__ import annotations

import pytest

from svdray.config import ConfigError, load_config
from svdray.tune.space import param_space, trial_config
from tests.support.runs import SEARCH


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lora.rnak": {"choice": [4]}}, "tune.search_space.lora.rnak: not a config key"),
        ({"lora": {"choice": [4]}}, "tune.search_space.lora: a section, not a key"),
        ({"lora.rank": {"normal": [0, 1]}}, "tune.search_space.lora.rank: expected one of"),
        ({"lora.rank": {"choice": [4, "big"]}}, "tune.search_space.lora.rank.choice[1]: expected an integer"),
        ({"lora.rank": {"choice": [4, 0]}}, "value 0 gives an invalid config: lora.rank: must be positive"),
        ({"lora.rank": {"uniform": [2, 8]}}, "tune.search_space.lora.rank.uniform: expected an integer"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "optim.lr.loguniform: bounds must be positive"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "optim.lr.uniform: low must be below high"),
        ({"train.name": {"choice": ["a", "b"]}}, "tune.search_space.train.name: not searchable"),
        ({"lora.rank": {"choice": [4]}}, "train.max_steps: 4 steps per trial is below tune.grace_period 100"),
    ],
)
def test_search_space_errors_name_the_key(tmp_path, one_clip_manifest, write_config, space, message):
    path = write_config(one_clip_manifest, tune={"search_space": space})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_trial_config_applies_params_and_stable_names(tmp_path, one_clip_manifest, write_config):
    path = write_config(
        one_clip_manifest,
        train={"name": "base", "max_steps": 50},
        tune={
            "search_space": {**SEARCH, "lora.blocks": {"grid": [["spatial"], ["spatial", "temporal"]]}},
            "max_t": 20,
            "grace_period": 5,
        },
    )
    cfg = load_config(path)
    assert set(param_space(cfg)) == {"lora.rank", "optim.lr", "lora.blocks"}
    import numpy as np

    trial = trial_config(
        cfg, {"lora.rank": 2, "optim.lr": np.float64(3e-4), "lora.blocks": ["temporal"]}, "ab_00001"
    )
    assert (trial.lora.rank, trial.optim.lr, trial.lora.blocks) == (2, 3e-4, ["temporal"])
    assert trial.train.name == "base-sweep-ab_00001"  # stable per trial: a restarted trial resumes
    assert trial.train.max_steps == 20  # tune.max_t is the trial's budget (and ASHA's max_t)
    assert trial.output_dir == str(tmp_path / "out" / "base-sweep" / "trials" / "ab_00001")
    assert trial.lora.alpha == cfg.lora.alpha  # everything else is the sweep's config
