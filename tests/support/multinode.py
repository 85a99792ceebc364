"""A driver process for tests/integration/test_multinode.py: a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head and worker nodes, each its own raylet, object store and
worker processes), and `svdray train` runs on it through `run_training`, the function the CLI
calls; optionally a whole worker node is killed mid-run (its raylet and every process on it)
and a fresh node joins, as when a cloud node is preempted and replaced (with
`add_node_at_workers`, only later: an elastic run goes on with fewer workers in between).

It runs as a separate process because a Ray driver connects to one cluster: the test session's
own local one (the `ray_cluster` fixture) cannot share a process with this one. One process serves
every multi-node test of a session: the cluster starts once, and each run asks for the worker
nodes it needs (how many, and how many workers each has room for), which are added or removed
before it starts.

    python -m tests.support.multinode serve        # JSON requests on stdin, one per line
    python -m tests.support.multinode --config run.yaml --out result.json [--lose-node-after step_00000002]

A request: {"config": PATH, "out": PATH, "worker_nodes": 2, "trainer_slots": 2,
"own_folders": DIR | null, "wait_http": URL | null, "lose_node_after": "step_00000002" | null,
"add_node_at_workers": 1 | null}; the answer, one line on stdout: "ok" once the run's report is
written to `out`, else "error: <traceback>".

With `own_folders`, each worker node gets a working folder of its own (its TMPDIR, HOME and
XDG_CACHE_HOME, under DIR) and none of the object-storage settings in its environment: a run
whose shared state is all in a bucket must then reach it through the settings its runtime
environment carries (svdray's `init_ray`), as on a cluster whose nodes share nothing. With
`wait_http`, the run starts once that URL answers (a tracking server the nodes reach).

Layout: the head holds the driver, Ray Train's controller, the data decoders and the run's small
actors (data ledger, progress board); only the worker nodes offer the custom resource
`trainer`, which the run's workers ask for (`train.resources_per_worker`), so training runs on
worker nodes only and losing one never takes the controller or the data with it. Where the
workers go within the nodes' room is up to `train.placement`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
READY = "ready"


def own_folders_env(root: Path) -> dict[str, str]:
    """A new worker node's environment overrides: folders of its own under `root`, and no
    object-storage settings (empty is unset for svdray and the cloud SDKs alike)."""
    home = root / f"node-{len(list(root.glob('node-*')))}"
    (home / "tmp").mkdir(parents=True)
    env = {name: "" for name in SETTINGS_ENV}
    return {**env, "TMPDIR": str(home / "tmp"), "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")}


def signal_if_alive(pid: int, sig: int) -> None:
    """A signal to a process that may have ended since it was listed (a worker the run lost)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class Nodes:
    """The cluster and what each of its live worker nodes is: its room (`trainer` slots) and its
    own folders' root (None: the machine's)."""

    def __init__(self) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": HEAD_CPUS,
                "object_store_memory": OBJECT_STORE_BYTES,
                # Ray starts a dashboard process even so: on a free port, never a taken default.
                "include_dashboard": False,
                "dashboard_port": free_port(),
            },
        )
        self.kind: dict[str, tuple[int, Path | None]] = {}  # node id -> (trainer slots, own folders)
        self.slots, self.own_folders = TRAINER_SLOTS, None  # what nodes added next are

    def add(self) -> bool:
        node = self.cluster.add_node(
            num_cpus=NODE_CPUS,
            resources={"trainer": float(self.slots)},
            object_store_memory=OBJECT_STORE_BYTES,
            env_vars=own_folders_env(self.own_folders) if self.own_folders else None,
        )
        self.kind[node.node_id] = (self.slots, self.own_folders)
        return True

    def join(self) -> bool:
        """A node joins the running cluster, and Ray Train's elastic policy sees it at once.

        Otherwise the number of steps run before the group regrows would depend on this
        machine's speed (on a fast CPU a whole run fits in the waits). Two waits are taken out:
        - the node's start: the training workers are held meanwhile (SIGSTOP; Ray Train reads a
          worker that does not answer its poll as busy, for up to 10 minutes);
        - the 20-s tick on which Ray's AutoscalingCoordinator, through which the policy sees
          nodes, looks at the cluster: `recompute=True` is its own way to look now."""
        workers = [
            actor["Pid"]
            for actor in ray._private.state.actors().values()
            if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"
        ]
        for pid in workers:
            signal_if_alive(pid, signal.SIGSTOP)
        try:
            self.add()
            self.cluster.wait_for_nodes()
        finally:
            for pid in workers:
                signal_if_alive(pid, signal.SIGCONT)
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("tests.support.multinode", recompute=True))
        return True

    def remove(self, node: Any) -> str:
        """Kill a worker node whole: SIGKILL to its raylet and every process on it."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.kind.pop(node.node_id, None)
        return node.node_id

    def reshape(self, count: int, slots: int, own_folders: Path | None) -> None:
        """Exactly `count` live worker nodes with room for `slots` workers each (and their own
        folders under `own_folders`); nodes added during the run are of that kind too."""
        self.slots, self.own_folders = slots, own_folders
        for node in list(self.cluster.worker_nodes):
            if self.kind.get(node.node_id) != (slots, own_folders) or len(self.cluster.worker_nodes) > count:
                self.remove(node)
        while len(self.cluster.worker_nodes) < count:
            self.add()
        self.cluster.wait_for_nodes()

    def worker_ids(self) -> list[str]:
        return [node.node_id for node in self.cluster.worker_nodes]


def training_nodes() -> list[str]:
    """The nodes of the live worker group's placement group (the one whose bundles ask for
    `trainer`), one entry per bundle; empty while none is placed."""
    for group in ray.util.placement_group_table().values():
        bundles = group.get("bundles", {})
        if group["state"] == "CREATED" and any("trainer" in b for b in bundles.values()):
            return [group["bundles_to_node_id"][i] for i in sorted(group["bundles_to_node_id"])]
    return []


def lose_node(nodes: Nodes, lost: list[str], replace: bool) -> bool:
    """Kill the worker node holding the first bundle of the worker group, then (if `replace`)
    add a fresh node; False while no worker group is placed."""
    placed = training_nodes()
    if not placed:
        return False
    victim = next(node for node in nodes.cluster.worker_nodes if node.node_id == placed[0])
    lost.append(nodes.remove(victim))
    if replace:
        nodes.add()
    return True


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


def run(nodes: Nodes, request: dict[str, Any]) -> dict[str, Any]:
    """One training run on worker nodes shaped as `request` asks, with its node events; its report.

    The run connects as `svdray train` connects (svdray.train.trainer.init_ray, its object-storage
    settings in the runtime environment) and disconnects at its end."""
    cfg = load_config(request["config"])
    cfg.ray.address = nodes.cluster.address
    own_folders = Path(request["own_folders"]) if request.get("own_folders") else None
    nodes.reshape(request.get("worker_nodes", 2), request.get("trainer_slots", TRAINER_SLOTS), own_folders)
    if request.get("wait_http"):
        wait_for(request["wait_http"])
    worker_nodes = nodes.worker_ids()
    lost: list[str] = []
    try:
        if request.get("lose_node_after"):
            from tests.support.resume import run_with_events

            after, add_at = request["lose_node_after"], request.get("add_node_at_workers")
            replace = add_at is None
            events = [(lambda registered: after in registered, lambda: lose_node(nodes, lost, replace))]
            if add_at is not None:
                events.append(
                    (
                        lambda registered: any(m.get("num_workers") == add_at for m in registered.values()),
                        nodes.join,
                    )
                )
            result: TrainingResult = run_with_events(cfg, events)
        else:
            result = run_training(cfg)
    finally:
        ray.shutdown()
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()},
        "head_node": nodes.cluster.head_node.node_id,
        "worker_nodes": worker_nodes,
        "lost_nodes": lost,
        "nodes_at_end": nodes.worker_ids(),
    }


def serve(nodes: Nodes, requests: Any, answers: Any) -> None:
    """Runs each request (a JSON line) in turn; answers "ok" or "error: ..." on one line each."""
    print(READY, file=answers, flush=True)
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            report = run(nodes, request)
            Path(request["out"]).write_text(json.dumps(report, indent=1))
            answer = "ok"
        except BaseException:
            answer = "error: " + json.dumps(traceback.format_exc())
        print(answer, file=answers, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["serve"], help="serve requests from stdin")
    parser.add_argument("--config")
    parser.add_argument("--out", help="the run's result and the cluster's nodes, as JSON")
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
    if args.mode != "serve" and not (args.config and args.out):
        parser.error("give `serve`, or --config and --out for one run")
    if args.config:
        load_config(args.config)  # a bad config fails before the cluster starts
    nodes = Nodes()
    try:
        if args.mode == "serve":
            # The answers keep stdout to themselves; whatever else prints (the runs' progress
            # lines, Ray) goes to stderr.
            answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            serve(nodes, sys.stdin, answers)
        else:
            request = {
                "config": args.config,
                "out": args.out,
                "worker_nodes": args.worker_nodes,
                "trainer_slots": args.trainer_slots,
                "own_folders": args.own_folders,
                "wait_http": args.wait_http,
                "lose_node_after": args.lose_node_after,
                "add_node_at_workers": args.add_node_at_workers,
            }
            Path(args.out).write_text(json.dumps(run(nodes, request), indent=1))
    finally:
        ray.shutdown()
        nodes.cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())


class MultinodeDriver:
    """The test side of `python -m tests.support.multinode serve`: the process, started once, and
    `run(config, ...)` for each multi-node run (its report)."""

    def __init__(self, workdir: Path, env: dict[str, str], timeout: float = 900) -> None:
        import subprocess

        from tests.support.paths import REPO

        self.timeout = timeout
        self.log = workdir / "multinode-driver.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.multinode", "serve"],
                cwd=workdir,
                env={**env, "PYTHONPATH": str(REPO)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self._answer() == READY

    def _answer(self) -> str:
        import selectors
        import time

        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=1.0):
                line = self.process.stdout.readline()
                if line:
                    return line.strip()
            if self.process.poll() is not None:
                break
        raise AssertionError(f"the multi-node driver stopped answering; its log:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text()[-chars:]

    def run(
        self,
        config: Path,
        worker_nodes: int = 2,
        trainer_slots: int = TRAINER_SLOTS,
        own_folders: Path | None = None,
        wait_http: str | None = None,
        lose_node_after: str | None = None,
        add_node_at_workers: int | None = None,
    ) -> dict[str, Any]:
        out = config.with_suffix(".json")
        request = {
            "config": str(config),
            "out": str(out),
            "worker_nodes": worker_nodes,
            "trainer_slots": trainer_slots,
            "own_folders": str(own_folders) if own_folders else None,
            "wait_http": wait_http,
            "lose_node_after": lose_node_after,
            "add_node_at_workers": add_node_at_workers,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        assert answer == "ok", f"{request} failed:\n{json.loads(answer[len('error: ') :])}\n{self.tail()}"
        return json.loads(out.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except Exception:
            self.process.kill()
