"""Helpers of the tests whose runs survive failures (tests/integration/test_resume.py,
test_multinode.py and the multi-node driver tests/support/multinode.py): one config shape for
runs that are compared step by step, LoRA and MLflow readers, and running a training while a
fault is injected."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from svdray import storage
from svdray.config import Config, config_from_dict
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.train.trainer import TrainingResult, run_training
from tests.support.runs import TINY_DATA

MAX_STEPS = 12
CHECKPOINT_EVERY = 2
NAN_STEP = 7


def config_tree(root: Path, pipeline_dir: Path, name: str, **train) -> dict:
    return {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"manifest": str(root / "train.jsonl"), **TINY_DATA},
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
            "max_bad_steps": 2,
            "debug_nan_at_steps": [NAN_STEP],
            **train,
        },
        "validate": {"manifest": str(root / "val.jsonl"), "every": 6, "num_videos": 1, "steps": 2},
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


def all_values(uri: str, run_id: str, key: str) -> dict[int, list[float]]:
    """Every value logged for `key`, per step, in logging order."""
    values: dict[int, list[float]] = {}
    for m in sorted(
        MlflowClient(tracking_uri=uri).get_metric_history(run_id, key), key=lambda m: m.timestamp
    ):
        values.setdefault(m.step, []).append(m.value)
    return values


def run_id_of(root: Path, name: str) -> str:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0].info.run_id


def train_worker_pid(workers: int = 1) -> int | None:
    """The pid of a training worker while exactly `workers` are alive (one worker group), else None."""
    from ray.util.state import list_actors

    alive = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return alive[0].pid if len(alive) == workers else None


def run_and_kill_worker(cfg: Config, after_checkpoint: str, workers: int = 1) -> TrainingResult:
    """run_training; one of its `workers` training worker processes is SIGKILLed once
    `after_checkpoint` is registered."""

    def kill() -> bool:
        pid = train_worker_pid(workers)
        if pid:
            os.kill(pid, signal.SIGKILL)
        return pid is not None

    return run_and_fail(cfg, after_checkpoint, kill)


def run_and_fail(cfg: Config, after_checkpoint: str, fail: Callable[[], bool]) -> TrainingResult:
    """run_training in a thread; `fail()` (a fault: kill a worker, a node) is called once
    `after_checkpoint` is registered in Ray Train's checkpoint manager snapshot (so a restore can
    find it), and again until it returns True (it found what to kill)."""
    return run_with_events(cfg, [(lambda registered: after_checkpoint in registered, fail)])


Registered = dict[str, dict]  # checkpoint name -> the metrics reported with it


def registered_checkpoints(cfg: Config) -> Registered:
    """The checkpoints Ray Train's checkpoint manager snapshot holds (a restore can find them),
    in a local storage path or a bucket."""
    snapshot = storage.join(cfg.train.storage_path, cfg.train.name, "checkpoint_manager_snapshot.json")
    try:
        results = json.loads(storage.read_text(snapshot))["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not yet, or being written
        return {}
    return {r["checkpoint_dir_name"]: r["metrics"] for r in results}


def run_with_events(
    cfg: Config, events: list[tuple[Callable[[Registered], bool], Callable[[], bool]]]
) -> TrainingResult:
    """run_training in a thread; each event (condition, action) in turn: the action (kill a worker,
    a node; add a node) is called once the condition holds for the registered checkpoints, and
    again until it returns True (it found what to act on)."""
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(cfg)
        except BaseException as err:  # re-raised in the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    pending = list(events)
    poll = 0.25 if storage.is_remote(cfg.train.storage_path) else 0.02  # a bucket: a request per look
    while pending and thread.is_alive() and time.monotonic() < deadline:
        condition, act = pending[0]
        if condition(registered_checkpoints(cfg)) and act():
            pending.pop(0)
        time.sleep(poll)
    if pending:
        thread.join(timeout=300)
        pytest.fail(f"the run ended before all its events could happen ({len(pending)} left): {outcome}")
    thread.join(timeout=300)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
