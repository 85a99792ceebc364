"""Ray jobs the way users launch them: `ray job submit` to a head started with `ray start --head`,
`ray job stop`, and a resubmission that resumes from the run's checkpoint."""

from __future__ import annotations

import importlib.util
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


def job_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_train_job_stop_and_resume(ray_head, tmp_path, one_clip_manifest, write_config):
    """Submit, stop mid-run with `ray job stop`, resubmit the same command: the job resumes from
    its latest checkpoint (steps before it are not redone) and finishes in the same MLflow run."""
    steps, every = 24, 3
    path = write_config(
        one_clip_manifest,
        train={"name": "stopme", "max_steps": steps, "checkpoint_every": every, "log_every": 1},
    )
    # --verbose: the workers' step lines and resume messages in the job's log, checked below.
    entrypoint = ["python", "jobs/train.py", "--config", str(path), "--verbose"]
    run_dir = tmp_path / "out" / "ray" / "stopme"

    first = job_id("stop")
    ray_head.submit(entrypoint, wait=False, check=True, extra=["--submission-id", first])
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("step_*")):
        status = ray_head.job_info(first)["status"]
        assert status in ("PENDING", "RUNNING"), ray_head.job("logs", first).stdout[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.25)
    ray_head.job("stop", first, check=True)
    assert ray_head.job_info(first)["status"] == "STOPPED"  # stopped mid-run, not finished
    first_logs = ray_head.job("logs", first, check=True).stdout
    assert f"step {every}/{steps} loss" in first_logs and "resumed from" not in first_logs

    second = job_id("resume")
    result = ray_head.submit(entrypoint, timeout=400, extra=["--submission-id", second])
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-6000:] + ray_head.state()

    resumed = re.search(r"resumed from \S+: step (\d+)", logs)
    assert resumed, logs[-6000:]
    k = int(resumed.group(1))
    assert k >= every and k % every == 0 and k < steps
    assert "resuming stopme from" in logs
    # The second attempt trains from step k+1 on.
    assert min(int(s) for s in re.findall(rf"step (\d+)/{steps} loss", logs)) == k + 1

    # One MLflow run across both attempts, finished, with every step's metrics; the steps up to
    # the checkpoint were logged once (not redone), those after it at most twice.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_name for r in runs] == ["stopme"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    counts = Counter(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert set(counts) == set(range(1, steps + 1))
    assert all(counts[s] == 1 for s in range(1, k + 1)) and max(counts.values()) <= 2
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("svdray.data.prepare") is None,
    reason="svdray.data.prepare comes with the data issue",
)
def test_prepare_job(ray_head, tmp_path, one_clip_manifest):
    out = tmp_path / "prepared"
    result = ray_head.submit(
        ["python", "jobs/prepare.py", "--manifest", str(one_clip_manifest), "--out", str(out)], timeout=300
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in logs, logs[-6000:] + ray_head.state()
    assert (out / "clean.jsonl").read_text().count("\n") == 1
    assert Path(out / "rejects.jsonl").exists()
