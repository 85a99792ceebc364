"""What an operator sees: the console of `make demo`'s `svdray train` (a subprocess, its output
captured as a job's log would be) and the MLflow run it leaves, read back through the UI server's
REST API."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys

import decord
from PIL import Image

from svdray.data.demo import write_demo_manifests
from svdray.tracking import NOT_PARAMS, TRAIN_SECTIONS
from tests.support.exports import assert_finite_lora, assert_run_exports
from tests.support.paths import REPO

# Lines a user would take for trouble: warnings, errors, deprecations, tracebacks, C++ log lines
# ("[... E 1234 5678] core_worker.cc:..."), Ray's raw result dumps, any line Ray forwards from a
# worker process ("(pid=...)", "(RayTrainWorker pid=...)") or from the raylet ("(raylet) ...").
TROUBLE = re.compile(
    r"warn|error|deprecat|traceback|exception|\bE \d+ \d+\]|core_worker|TrainingReport|pid=\d|\(raylet\)",
    re.IGNORECASE,
)


DEMO = REPO / "configs" / "demo.yaml"


def test_demo_console_and_mlflow_run(mlflow_ui, tmp_path, tiny_pipeline_dir):
    """`make demo`'s command, `svdray train --config configs/demo.yaml` (two workers, two decoders,
    4 logical CPUs on a 2-core machine: the process count that made the raylet warn, see
    init_ray), on the tiny pipeline and `svdray demo-data`'s manifests; only steps, sampling steps
    and paths overridden. Its run is also the demo config's run of test_configs.py: it exports."""
    mlflow_server, db = mlflow_ui
    train, held_out = write_demo_manifests(tmp_path / "manifest.jsonl", tmp_path / "val.jsonl")
    overrides = {
        "model.pretrained": tiny_pipeline_dir,
        "data.manifest": train,
        "validate.manifest": held_out,
        "train.max_steps": 3,
        "train.checkpoint_every": 2,
        "validate.every": 2,
        "validate.steps": 2,
        "sample.steps": 2,
        "output_dir": tmp_path / "out",
        "train.storage_path": tmp_path / "ray",
        "mlflow.tracking_uri": f"sqlite:///{db}",
        "mlflow.experiment": "console",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    argv = ["train", "--config", str(DEMO), *sets]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SVDRAY_VERBOSE")}
    result = subprocess.run(
        [sys.executable, "-m", "svdray.cli", *argv],
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
    # The summary: the last checkpoint, and how to browse the store this run logged to.
    assert f"checkpoint:  {tmp_path / 'ray' / 'demo' / 'step_00000003'}" in lines
    tracking = ["--set", f"mlflow.tracking_uri=sqlite:///{db}", "--set", "mlflow.experiment=console"]
    assert lines[-1] == "browse with: " + shlex.join(["svdray", "ui", "--config", str(DEMO), *tracking])
    # Not a terminal: plain progress lines, the last one at 3/3 with elapsed time, ETA, the loss
    # EMA and the validation loss.
    progress = [line for line in lines if line.startswith("train ")]
    assert progress, console
    final = r"train 3/3 steps \(100%\) \| elapsed \d+:\d\d \| ETA 0:00 \| samples/s [\d.]+"
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
    assert sorted(int(m["step"]) for m in val) == [2, 3]  # every 2 steps, and the last
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["data.accepted"] == "3" and tags["data.samples_fed"] == "12"  # 3 steps x 2 workers x 2

    # Params for the sections a training run uses only (the whole config is config.yaml).
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["lora.rank"] == "8" and params["validate.every"] == "2"
    # None from tune., reward., mlflow. or ray., nor where files go
    assert {key.split(".")[0] for key in params} <= {*TRAIN_SECTIONS, "svd"}
    assert not NOT_PARAMS & params.keys()
    assert "None" not in params.values()

    # Description, source and git commit.
    description = tags["mlflow.note.content"]
    assert f"train --config {DEMO}" in description and str(tiny_pipeline_dir) in description
    assert "3 clips" in description and str(held_out) in description and str(tmp_path / "out") in description
    assert "The demo model is random and tiny" in description  # the config's own, after
    assert tags["mlflow.source.name"] == shlex.join(["svdray", *argv])
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
    assert "validation/step_00000003/preview.gif" in listing("validation/step_00000003")

    # The LoRA names its base model.
    adapter = json.loads(artifact("lora/adapter_config.json"))
    assert adapter["base_model_name_or_path"] == str(tiny_pipeline_dir)

    # As every shipped config's run (test_configs.py): the sample has the clip's frames, the last
    # validation sampled the config's videos, and the LoRA is finite and exports.
    out = tmp_path / "out"
    assert len(decord.VideoReader(str(out / "samples" / "sample.mp4"))) == 8
    assert len(list((out / "validation" / "step_00000003").glob("clip*.mp4"))) == 1
    assert_finite_lora(out / "lora")
    assert_run_exports(out, "svd", tmp_path / "export")
