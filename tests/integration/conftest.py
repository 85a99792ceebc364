"""Fixtures of the integration tier: one real local Ray cluster per test session, a Ray head for
`ray job submit`, the MLflow server, and object stores (S3, GCS) on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.servers import free_port


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

    # The dashboard stays on (an early-stopped Tune trial's resources are only freed with it on)
    # and binds to 127.0.0.1 on a free port, so parallel test sessions never collide. The object
    # store's settings reach the workers as svdray's own `init_ray` passes them: in the runtime
    # environment.
    ray.init(
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


@pytest.fixture
def mlflow_ui(tmp_path):
    """`svdray ui` for a sqlite store in tmp: the MLflow server (UI + REST API) on 127.0.0.1.

    Tests read their runs back through it, as the UI does (the sweep's runs, a training run)."""
    from tests.support.paths import REPO
    from tests.support.servers import MlflowServer, end_marked, server_env, wait_for_http

    directory = tmp_path / "mlflow-ui"
    directory.mkdir()
    db = directory / "mlflow.db"
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
