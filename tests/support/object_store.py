"""Object stores on 127.0.0.1 for the tests: S3 (moto's server, with IAM signature checks on, so
wrong credentials are refused as AWS refuses them) and Google Cloud Storage (gcp-storage-emulator).

S3 runs in the test process (`ThreadedMotoServer`): the session fixture in
tests/integration/conftest.py starts it before the session's Ray cluster, so the cluster's
workers get its settings through the runtime environment, as a user's workers get theirs. The GCS
emulator runs as a process of its own (`python -m tests.support.object_store gcs --port N`): its
stock HTTP server answers one connection at a time, and a client that holds one connection open
(a ranged read while a streamed read is unfinished) then waits on itself forever, so the process
serves it with the standard library's threading HTTP server instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import REPO
from tests.support.servers import free_port

REGION = "us-east-1"


@dataclass
class S3Server:
    server: object  # moto.server.ThreadedMotoServer
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        """What a user sets to point svdray (and MLflow's own client) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def bucket(self, prefix: str) -> str:
        """A new, empty bucket (s3://NAME); names are 3-63 lowercase characters."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:8]}".lower()[:63]
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        ).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.server.stop()


def start_s3() -> S3Server:
    """moto's S3 (and IAM) on a free port of 127.0.0.1, with one IAM user allowed everything;
    from then on every request must be signed with that user's key (moto checks signatures once
    INITIAL_NO_AUTH_ACTION_COUNT requests have passed: here the three that create the user)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    iam.create_user(UserName="svdray")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="svdray", PolicyName="everything", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="svdray")["AccessKey"]
    request = urllib.request.Request(  # not a form: moto reads the raw body
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    return S3Server(server, endpoint, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass
class GcsEmulator:
    process: subprocess.Popen
    host: str  # http://127.0.0.1:PORT, as STORAGE_EMULATOR_HOST takes it

    def bucket(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}".lower()[:63]
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(
            f"{self.host}/storage/v1/b?project=test", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        return f"gs://{name}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_gcs(log: Path) -> GcsEmulator:
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.object_store", "gcs", "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"the GCS emulator exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b?project=test", timeout=2):
                return GcsEmulator(process, host)
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"the GCS emulator did not answer on {host}:\n{log.read_text()[-3000:]}")


def serve_gcs(port: int) -> None:
    """The emulator, in memory, its requests served in threads (see the module docstring)."""
    import http.server
    import logging

    import gcp_storage_emulator.server as emulator

    emulator.server.HTTPServer = http.server.ThreadingHTTPServer
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    emulator.create_server("127.0.0.1", port, in_memory=True).run()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="object stores for the tests")
    parser.add_argument("kind", choices=["gcs"])
    parser.add_argument("--port", type=int, required=True)
    serve_gcs(parser.parse_args().port)
