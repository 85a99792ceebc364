"""Real servers for the job and sweep tests: a Ray head started with `ray start --head` and the
MLflow server, each on free ports bound to 127.0.0.1, torn down with every process they started.

Every process of a server carries a marker in its environment (Ray passes its environment down to
raylets, workers, job supervisors and job drivers), so teardown finds and ends exactly those
processes by pid, even a job driver that Ray put in its own session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import REPO

BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow and the python jobs must use
MARKER = "SVDRAY_TEST_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry))
    return pids


def end_marked(marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM every marked process, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = marked_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not marked_pids(marker):
            return


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s:\n{log.read_text()[-3000:]}")


def server_env(marker: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(
        {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", MARKER: marker, "RAY_AUTH_MODE": "disabled"}
    )
    env.update(extra)
    return env


@dataclass
class RayHead:
    address: str  # the dashboard / Jobs API, http://127.0.0.1:PORT
    temp_dir: Path
    env: dict[str, str]  # for `ray job ...` commands against this head

    def job(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """`ray job <args>` against this head."""
        result = subprocess.run(
            [str(BIN / "ray"), "job", *args[:1], "--address", self.address, *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ray job {args[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n"
                + self.state()
            )
        return result

    def state(self) -> str:
        """The ends of the head's own logs: whether it is up, and which of its processes exited
        (a submit that finds no job agent, then a head that no longer answers)."""
        tails = []
        for pattern in (
            "ray_start.log",
            "session_latest/logs/ray_process_exit.log",
            "session_latest/logs/dashboard_agent.log",
        ):
            for log in sorted(self.temp_dir.glob(pattern)):
                tails.append(
                    f"--- {log.relative_to(self.temp_dir)} (end)\n{log.read_text(errors='replace')[-1500:]}"
                )
        return "\n".join(tails)

    def submit(
        self,
        entrypoint: list[str],
        runtime_env: Path | None = None,
        wait: bool = True,
        extra: list[str] | tuple[str, ...] = (),
        **kw,
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <repo> --runtime-env jobs/runtime_env.yaml -- <entrypoint>`,
        exactly as the README has it; without `wait` it returns once the job is accepted."""
        runtime_env = runtime_env or REPO / "jobs" / "runtime_env.yaml"
        args = ["submit", "--working-dir", str(REPO), "--runtime-env", str(runtime_env), *extra]
        if not wait:
            args.append("--no-wait")
        return self.job(*args, "--", *entrypoint, **kw)

    def job_info(self, job_id: str) -> dict:
        with urllib.request.urlopen(f"{self.address}/api/jobs/{job_id}", timeout=10) as response:
            return json.loads(response.read())


def start_ray_head(num_cpus: int = 2):
    """Start a head like a user would (`ray start --head`), in its own temp dir and ports.

    The head's processes find their own cluster by RAY_API_SERVER_ADDRESS: Ray Train's placement
    group cleaner queries the State API, which otherwise auto-detects the cluster and fails when
    another Ray instance (such as the test session's) runs on the same machine.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths are limited
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    # As the README's small head: the raylet's startup concurrency floor that svdray's own local
    # clusters get (svdray.train.trainer.init_ray), so job logs carry no worker-count warning.
    from svdray.train.trainer import MIN_STARTUP_CONCURRENCY, STARTUP_CONCURRENCY_ENV

    floor = {STARTUP_CONCURRENCY_ENV: str(MIN_STARTUP_CONCURRENCY)}
    env = server_env(temp_dir.name, RAY_API_SERVER_ADDRESS=address, **floor)
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
    ]
    command += ["--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    command += ["--object-store-memory=500000000", *(f"--{name}={port}" for name, port in ports.items())]
    log = temp_dir / "ray_start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(address, temp_dir, env)
    try:
        wait_for_http(f"{address}/api/version", proc, log)
        # The Jobs API answers a little after the dashboard itself, and submits through the head
        # node's dashboard agent, which starts later still: a submit that finds no agent within
        # 10 s fails ("No available agent to submit job"), as it did twice under the full suite.
        wait_for_http(f"{address}/api/jobs/", proc, log)
        agent = f"http://127.0.0.1:{ports['dashboard-agent-listen-port']}"
        wait_for_http(f"{agent}/api/local_raylet_healthz", proc, log)
    except BaseException:
        stop_ray_head(head)
        raise
    return head


def stop_ray_head(head: RayHead) -> None:
    end_marked(head.temp_dir.name)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    marker: str

    def get(self, endpoint: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.uri}{endpoint}?{query}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.uri}{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def read(self, endpoint: str, **params: str) -> bytes:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.uri}{endpoint}?{query}", timeout=30) as response:
            return response.read()
