"""A driver process for tests/integration/test_multinode.py: a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head and worker nodes, each its own raylet, object store and
worker processes), and one `svdray train` run on it through `run_training`, the function the CLI
calls; optionally a whole worker node is killed mid-run (its raylet and every process on it)
and a fresh node joins, as when a cloud node is preempted and replaced (with --add-node-at-workers,
only later: an elastic run goes on with fewer workers in between).

It runs as a separate process because a Ray driver connects to one cluster: the test session's
own local cluster (the `ray_cluster` fixture) cannot share a process with this one.

    python -m tests.support.multinode --config run.yaml --out result.json [--lose-node-after step_00000002]
        [--own-folders DIR] [--wait-http URL]

Layout: the head holds the driver, Ray Train's controller, the data decoders and the run's small
actors (data ledger, progress board); only the worker nodes offer the custom resource
`trainer`, which the run's workers ask for (`train.resources_per_worker`), so training runs on
worker nodes only and losing one never takes the controller or the data with it. Each worker node
has room for two workers (--trainer-slots), so where they go is up to `train.placement`.

With --own-folders, each worker node gets a working folder of its own (its TMPDIR, HOME and
XDG_CACHE_HOME, under DIR) and none of the object-storage settings in its environment: a run
whose shared state is all in a bucket must then reach it through the settings its runtime
environment carries (svdray's `init_ray`), as on a cluster whose nodes share nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from svdray.config import load_config
from svdray.storage import SETTINGS_ENV
from svdray.train.trainer import TrainingResult, run_training
from tests.support.servers import free_port

HEAD_CPUS = 3
NODE_CPUS = 2
TRAINER_SLOTS = 2  # workers a worker node has room for (its `trainer` resource)
OBJECT_STORE_BYTES = 150 * 1024**2  # Ray's minimum is 75 MiB; the tiny clips need little


OWN_FOLDERS: list[Path] = []  # --own-folders: the root of the worker nodes' own folders


def node_env() -> dict[str, str] | None:
    """A new worker node's environment overrides (--own-folders): its own folders, no storage
    settings (empty is unset for svdray and the cloud SDKs alike)."""
    if not OWN_FOLDERS:
        return None
    home = OWN_FOLDERS[0] / f"node-{len(list(OWN_FOLDERS[0].glob('node-*')))}"
    (home / "tmp").mkdir(parents=True)
    env = {name: "" for name in SETTINGS_ENV}
    return {**env, "TMPDIR": str(home / "tmp"), "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")}


def add_worker_node(cluster: Cluster, slots: int = TRAINER_SLOTS) -> bool:
    cluster.add_node(
        num_cpus=NODE_CPUS,
        resources={"trainer": float(slots)},
        object_store_memory=OBJECT_STORE_BYTES,
        env_vars=node_env(),
    )
    return True


def start_cluster(worker_nodes: int, slots: int = TRAINER_SLOTS) -> Cluster:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": HEAD_CPUS,
            "object_store_memory": OBJECT_STORE_BYTES,
            # Ray starts a dashboard process even so: on a free port, never a taken default.
            "include_dashboard": False,
            "dashboard_port": free_port(),
        },
    )
    for _ in range(worker_nodes):
        add_worker_node(cluster, slots)
    cluster.wait_for_nodes()
    return cluster


def training_nodes() -> list[str]:
    """The nodes of the live worker group's placement group (the one whose bundles ask for
    `trainer`), one entry per bundle; empty while none is placed."""
    for group in ray.util.placement_group_table().values():
        bundles = group.get("bundles", {})
        if group["state"] == "CREATED" and any("trainer" in b for b in bundles.values()):
            return [group["bundles_to_node_id"][i] for i in sorted(group["bundles_to_node_id"])]
    return []


def lose_node(cluster: Cluster, lost: list[str], replace: bool = True, slots: int = TRAINER_SLOTS) -> bool:
    """Kill the worker node holding the first bundle of the worker group (SIGKILL to its raylet
    and every process on it), then (if `replace`) add a fresh node; False while no worker group
    is placed."""
    placed = training_nodes()
    if not placed:
        return False
    victim = next(node for node in cluster.worker_nodes if node.node_id == placed[0])
    cluster.remove_node(victim, allow_graceful=False)
    lost.append(victim.node_id)
    if replace:
        add_worker_node(cluster, slots)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="the run's result and the cluster's nodes, as JSON")
    parser.add_argument("--worker-nodes", type=int, default=2)
    parser.add_argument("--trainer-slots", type=int, default=TRAINER_SLOTS, help="workers a node holds")
    parser.add_argument("--lose-node-after", help="kill a training node once this checkpoint is registered")
    parser.add_argument("--own-folders", help="give each worker node its own folders under this one")
    parser.add_argument("--wait-http", help="once the cluster is up, wait for this URL (a tracking server)")
    parser.add_argument(
        "--add-node-at-workers",
        type=int,
        help="with --lose-node-after: no replacement at once; a node joins once a checkpoint written "
        "by this many workers is registered (an elastic run going on with fewer)",
    )
    args = parser.parse_args(argv)

    cfg = load_config(args.config)  # a bad config fails before the cluster starts
    if args.own_folders:
        OWN_FOLDERS.append(Path(args.own_folders))
    cluster = start_cluster(args.worker_nodes, args.trainer_slots)
    try:
        # Connected as `svdray train` connects (svdray.train.trainer.init_ray): the object-storage
        # settings of this process go to every worker in the runtime environment.
        cfg.ray.address = cluster.address
        if args.wait_http:
            wait_for(args.wait_http)
        worker_nodes = [node.node_id for node in cluster.worker_nodes]
        lost: list[str] = []
        if args.lose_node_after:
            from tests.support.resume import run_with_events

            replace = args.add_node_at_workers is None
            events = [
                (
                    lambda registered: args.lose_node_after in registered,
                    lambda: lose_node(cluster, lost, replace, args.trainer_slots),
                )
            ]
            if not replace:
                events.append(
                    (
                        lambda registered: any(
                            m.get("num_workers") == args.add_node_at_workers for m in registered.values()
                        ),
                        lambda: add_worker_node(cluster, args.trainer_slots),
                    )
                )
            result: TrainingResult = run_with_events(cfg, events)
        else:
            result = run_training(cfg)
        report = {
            **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()},
            "head_node": cluster.head_node.node_id,
            "worker_nodes": worker_nodes,
            "lost_nodes": lost,
            "nodes_at_end": [node.node_id for node in cluster.worker_nodes],
        }
        Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


def wait_for(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
