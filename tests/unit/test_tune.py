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


def test_val_loss_metric_needs_a_validation_manifest(tmp_path, one_clip_manifest, write_config):
    path = write_config(
        one_clip_manifest, tune={"search_space": SEARCH, "grace_period": 2, "metric": "val_loss"}
    )
    with pytest.raises(ConfigError, match="tune.metric: val_loss needs validate.manifest"):
        load_config(path)


def test_summary_ranks_trials_and_marks_ties():
    """Ranked by objective; objectives within 0.5% of the next better one share its rank ("="),
    and the table says what "=" means; each row shows the trial's latest val_loss."""
    from svdray.tune.report import FINISHED, STOPPED, TrialSummary, format_table, summary_rows

    def trial(trial_id: str, objective: float | None, val_loss: float | None = None) -> TrialSummary:
        return TrialSummary(
            trial_id, {"lora.rank": 4}, FINISHED, 40, objective, f"run-{trial_id}", {}, val_loss
        )

    trials = [
        trial("a", 0.5000, 0.5000),
        trial("b", 0.5020, 0.5020),  # 0.4% above a: tied with it
        trial("c", 0.5200, 0.5200),  # 3.6% above b
        trial("d", 0.5225, 0.5225),  # 0.48% above c: tied with c
        trial("e", 0.6000, 0.6000),
        TrialSummary("f", {"lora.rank": 8}, STOPPED, 20, None, None),  # stopped before any objective
    ]
    rows = summary_rows(trials, ["lora.rank"], trials[0])
    assert [(r["trial"], r["rank"]) for r in rows] == [
        ("a *", "1="),
        ("b", "1="),
        ("c", "3="),
        ("d", "3="),
        ("e", "5"),
        ("f", ""),
    ]
    assert [r["val_loss"] for r in rows] == [0.5, 0.502, 0.52, 0.5225, 0.6, ""]
    table = format_table(rows)
    assert table.splitlines()[0].split() == [
        "trial", "lora.rank", "steps", "objective", "rank", "val_loss", "status", "mlflow_run"
    ]  # fmt: skip
    assert table.splitlines()[-1] == "=: tied, objectives within 0.5% of each other"
    # mode max ranks the largest first; without a tie, no note
    untied = summary_rows(trials[2:5], ["lora.rank"], None, mode="max")
    assert [r["rank"] for r in untied] == ["2=", "2=", "1"]
    assert "tied" not in format_table(summary_rows([trials[0], trials[2]], ["lora.rank"], None))
