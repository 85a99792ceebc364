"""Fixtures of the integration tier: one real local Ray cluster per test session, a Ray head for
`ray job submit`, the MLflow server, and object stores (S3, GCS) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.mlflow_store import seed_store
from tests.support.servers import free_port

# Which lane a module's tests take when its fixture would put it in the other: the tier is
# CPU-bound on two cores, so its time is that of the longer lane. By fixture alone, the lane of
# tests on the session's cluster took 3289 s and the other about 2300 (2026-12-04, 2 cores); with
# the modules below moved, the lanes took 1398 s and 1386 s (2026-12-04, 19:30-19:55 UTC, an
# AVX-512 EPYC). A test's time varies by up to half between runs, with what runs beside it. A
# module moved to the second lane that needs `ray_cluster` starts the session cluster in its
# process (the second lane's test_configs.py needs it anyway).
MOVED = {
    "test_configs.py": "lane-2",
    "test_object_storage.py": "lane-2",
    "test_benchmarks.py": "lane-2",
    "test_failures.py": "lane-2",
    "test_toy_family.py": "lane-2",
    "test_reference_run.py": "lane-2",
    "test_multinode.py": "lane-1",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two lanes for pytest-xdist (`-n 2 --dist loadgroup`), each one process running its tests
    one after another: the tests on the session's local cluster (`ray_cluster`, which they share)
    in lane 1; those whose Ray runs in processes of their own (`ray job submit` to the
    `ray_head`, a `svdray` subprocess, spawned gloo ranks) in lane 2; and each module in MOVED,
    whole, in the lane its time balances (its module fixtures, such as the multi-node cluster,
    start once)."""
    for item in items:
        default = "lane-1" if "ray_cluster" in item.fixturenames else "lane-2"
        item.add_marker(pytest.mark.xdist_group(MOVED.get(item.path.name, default)))
    order = cluster_order(items)
    items.sort(key=lambda item: order[item.path.name])


def cluster_order(items: list[pytest.Item]) -> dict[str, int]:
    """Where each module's tests go in its lane (a stable sort keeps each module whole): first
    those that start Ray of their own, then those on the session's cluster, then those on the
    `ray_head`. A session-scoped cluster starts with the first test that asks for it and lives to
    the end of the session, idling beside the lane's other tests (an idle one-node cluster used 6%
    of a core, 2026-12-04): so each starts as late as its lane allows."""
    fixtures: dict[str, set[str]] = {}
    for item in items:
        fixtures.setdefault(item.path.name, set()).update(item.fixturenames)
    return {
        module: 2 if "ray_head" in names else 1 if "ray_cluster" in names else 0
        for module, names in fixtures.items()
    }


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Refuse to run split lanes (in the controller, as each worker reports what it collected):
    a lane's tests spread over both workers would each start the clusters their module fixtures
    hold, two multi-node clusters on two cores. xdist puts a test's group into its id."""
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        raise pytest.UsageError(
            f"pytest-xdist did not group the tests into lanes (pytest {pytest.__version__}; "
            "see pyproject.toml's pin)"
        )


@pytest.fixture(scope="session")
def s3_store():
    """An S3 server on 127.0.0.1 (tests/support/object_store.py), with its settings in this
    process's environment for the whole session, as a user exports them: AWS_ENDPOINT_URL_S3,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, MLFLOW_S3_ENDPOINT_URL."""
    from tests.support.object_store import start_s3

    server = start_s3()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture(scope="session")
def gcs_store(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 (anonymous, in memory), in its own process."""
    from tests.support.object_store import start_gcs

    emulator = start_gcs(tmp_path_factory.mktemp("gcs") / "emulator.log")
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_store):
    import ray

    from svdray import storage
    from svdray.train.trainer import MIN_STARTUP_CONCURRENCY, STARTUP_CONCURRENCY_ENV

    os.environ.setdefault(STARTUP_CONCURRENCY_ENV, str(MIN_STARTUP_CONCURRENCY))  # as svdray's own

    # The dashboard stays on (an early-stopped Tune trial's resources are only freed with it on)
    # and binds to 127.0.0.1 on a free port, so parallel test sessions never collide. The object
    # store's settings reach the workers as svdray's own `init_ray` passes them: in the runtime
    # environment.
    ray.init(
        address="local",  # our own, never a cluster another test or agent started on this machine
        runtime_env={"env_vars": storage.runtime_env_vars()},
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        object_store_memory=2 * 1024**3,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A separate Ray cluster started with `ray start --head` (2 CPUs, dashboard and Jobs API on
    127.0.0.1), for `ray job submit` tests; the test process never connects to it with ray.init."""
    from tests.support.servers import start_ray_head, stop_ray_head

    head = start_ray_head(num_cpus=2)
    yield head
    stop_ray_head(head)


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, s3_store):
    """A simulated multi-node Ray cluster (a head and worker nodes, tests/support/multinode.py)
    with its driver process, started once for a test module; each run asks for the worker nodes
    it needs. A restart that waits for room (a lost node) gives up after 20 s, not Ray Train's 60,
    and tries again: the elastic test then goes on with the workers that fit. Its driver has the
    S3 server's settings in its environment, as `svdray train` on a cluster's head would."""
    from tests.support.multinode import MultinodeDriver

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    driver = MultinodeDriver(tmp_path_factory.mktemp("multinode-driver"), env)
    yield driver
    driver.close()


@pytest.fixture
def write_config(write_config):
    """The tiers' `write_config`, its sqlite MLflow store put in place already migrated
    (tests/support/mlflow_store.py): a run's results are the same, minus seconds of migrations."""
    import yaml

    def _write(manifest, **sections):
        path = write_config(manifest, **sections)
        seed_store(yaml.safe_load(path.read_text())["mlflow"]["tracking_uri"])
        return path

    return _write


@pytest.fixture
def mlflow_ui(tmp_path):
    """`svdray ui` for a sqlite store in tmp: the MLflow server (UI + REST API) on 127.0.0.1.

    Tests read their runs back through it, as the UI does (the sweep's runs, a training run)."""
    from tests.support.paths import REPO
    from tests.support.servers import MlflowServer, end_marked, server_env, wait_for_http

    directory = tmp_path / "mlflow-ui"
    directory.mkdir()
    db = directory / "mlflow.db"
    seed_store(db)
    port = free_port()
    marker = f"ui-{port}-{tmp_path.name}"
    log = directory / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "svdray.cli",
                "ui",
                "--set",
                f"mlflow.tracking_uri=sqlite:///{db}",
                "--port",
                str(port),
            ],
            env={**server_env(marker), "PYTHONPATH": str(REPO)},
            cwd=directory,  # proxied artifacts land in ./mlartifacts here
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield MlflowServer(f"http://127.0.0.1:{port}", marker), db
    finally:
        end_marked(marker)
