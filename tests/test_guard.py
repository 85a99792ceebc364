"""The numerical guard on a real run: NaN losses injected at chosen steps (train.debug_nan_at_steps)
are skipped and counted, and too many in a row stop the run, keeping the last good checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from svdray import cli
from svdray.model.lora import ADAPTER_WEIGHTS
from svdray.tracking import metric_history
from svdray.train.checkpoint import OPTIMIZER_FILE, read_checkpoint_payload

LR = 1e-3
WARMUP = 4


def test_nan_steps_are_skipped_then_stop_the_run(
    ray_cluster, tmp_path, one_clip_manifest, write_config, capsys
) -> None:
    path = write_config(
        one_clip_manifest,
        optim={"lr": LR, "warmup_steps": WARMUP, "schedule": "constant"},
        train={
            "name": "guard",
            "max_steps": 6,
            "checkpoint_every": 1,
            "keep_checkpoints": 10,
            "max_bad_steps": 2,
            # Step 2 is skipped and training goes on; steps 4 and 5 in a row stop it at step 5.
            "debug_nan_at_steps": [2, 4, 5],
            # A stop is a decision, not a failure: it must not be retried from the checkpoint.
            "max_failures": 1,
        },
    )
    assert cli.main(["train", "--config", str(path)]) == 1
    message = capsys.readouterr().err
    assert "stopped at step 5: 2 updates in a row (steps 4-5)" in message
    assert "the last good checkpoint is step_00000003" in message

    # Checkpoints only after good updates: steps 1 and 3; the stop kept step 3 as the latest.
    run_dir = tmp_path / "out" / "ray" / "guard"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000001", "step_00000003"]
    state = read_checkpoint_payload(run_dir / "step_00000003")
    assert state["train"] == {"step": 3, "samples_seen": 3, "bad_steps": 1}
    # Two updates happened (steps 1 and 3): the skipped step moved neither optimizer nor schedule.
    optimizer = load_file(str(run_dir / "step_00000003" / OPTIMIZER_FILE))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {2.0}
    assert state["lr_scheduler"]["last_epoch"] == 2
    # The NaN gradients of step 2 were dropped: step 3's update is finite and moved the weights.
    step1 = load_file(str(run_dir / "step_00000001" / "lora" / ADAPTER_WEIGHTS))
    step3 = load_file(str(run_dir / "step_00000003" / "lora" / ADAPTER_WEIGHTS))
    assert all(torch.isfinite(t).all() for t in step3.values())
    assert any(not torch.equal(step1[k], step3[k]) for k in step1)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    assert run.data.tags["svdray.stopped"].startswith("stopped at step 5")
    assert metric_history(uri, run_id, "bad_steps") == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]
    losses = dict(metric_history(uri, run_id, "loss"))
    assert [math.isnan(losses[s]) for s in range(1, 6)] == [False, True, False, True, True]
    # Warmup advances only on applied updates: 1/4, 1/4 (skipped), 2/4, 2/4, 2/4 of the lr.
    lrs = [value for _, value in metric_history(uri, run_id, "lr")]
    assert lrs == pytest.approx([LR * f for f in (0.25, 0.25, 0.5, 0.5, 0.5)])
    assert not client.get_metric_history(run_id, "resumed_from_step")  # not retried
