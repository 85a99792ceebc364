"""The job entrypoints refuse what would fail inside a Ray job: relative paths, a python without
svdray's dependencies (tests/integration/test_jobs.py submits real jobs to a Ray head)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.paths import REPO


def test_job_entrypoint_refuses_relative_paths():
    """A job runs in a temporary copy of the working dir: relative outputs would vanish with it."""
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "configs/demo.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "output_dir: 'demo/outputs' is relative" in result.stderr
    assert "mlflow.tracking_uri: 'sqlite:///demo/mlflow.db' is relative" in result.stderr


def test_job_entrypoint_names_a_python_without_dependencies(tmp_path):
    """`python` in a job is the head's: one without svdray's dependencies gets told what to do."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    result = subprocess.run(
        [str(bare / "bin" / "python"), "jobs/tune.py", "--config", "configs/demo.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "has no torch" in result.stderr and "ray start" in result.stderr
