"""`train.parallel: fsdp` through the whole Ray Train loop (real Ray, Ray Data, MLflow on sqlite,
decoded mp4s, the tiny Wan pipeline on 2 CPU workers with gloo): an FSDP2 run whose worker is
killed after its first checkpoint ends with DDP's loss curve (every logged value, the redone
steps' included), validation loss, LoRA folder and exports; its checkpoint then resumes on one
worker. The numerical equality of the step itself (and its tolerances) is
tests/integration/test_sharded_steps.py's; here it is the loop's wiring: sharding, the collective validation,
every worker's checkpoint shards reported to Ray Train and restored after a restart."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from svdray.config import load_config
from svdray.data.demo import write_demo_manifests
from svdray.export import export
from svdray.models.wan.pipeline import save_tiny_wan_pipeline
from svdray.train.checkpoint import read_checkpoint_payload
from svdray.train.trainer import TrainingResult, run_training
from tests.support.parallel_runs import assert_lora_close, drift, lora_size
from tests.support.resume import all_values, run_and_kill_worker

STEPS, LR = 3, 1e-2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    write_demo_manifests(root / "train.jsonl", root / "val.jsonl")
    save_tiny_wan_pipeline(root / "tiny-wan", "i2v", seed=0)
    return root


def write_config(root: Path, name: str, **train) -> Path:
    tree = {
        "model": {"family": "wan", "pretrained": str(root / "tiny-wan")},
        "data": {
            "manifest": str(root / "train.jsonl"),
            "num_frames": 9,
            "height": 32,
            "width": 32,
            "fps": 8.0,
            "decode_cpus": 0.5,
            "decoders": 1,
        },
        "lora": {"rank": 4, "alpha": 4, "feed_forward": True},
        "optim": {"lr": LR, "warmup_steps": 1},
        "train": {
            "name": name,
            "max_steps": STEPS,
            "num_workers": 2,
            "gradient_checkpointing": True,
            "checkpoint_every": 1,
            "keep_checkpoints": STEPS,
            "storage_path": str(root / "ray"),
            **train,
        },
        # One held-out clip on two workers: the second runs a forward it does not count (the
        # sharded forward is collective), and both sample the video rank 0 writes.
        "validate": {"manifest": str(root / "val.jsonl"), "every": STEPS, "num_videos": 1, "steps": 2},
        "sample": {"enabled": False},
        "output_dir": str(root / name),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "fsdp"},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, root) -> TrainingResult:
    return run_training(load_config(write_config(root, "ddp")))


@pytest.fixture(scope="module")
def fsdp_run(ray_cluster, root) -> TrainingResult:
    """FSDP2; one worker process SIGKILLed once step 1's checkpoint is in storage: Ray Train
    restarts the group (train.max_failures=1) from the latest checkpoint, each worker reloading
    its shards."""
    cfg = load_config(write_config(root, "fsdp", parallel="fsdp", max_failures=1))
    return run_and_kill_worker(cfg, "step_00000001", workers=2)


def test_killed_fsdp_run_ends_as_ddp(ddp_run: TrainingResult, fsdp_run: TrainingResult, root: Path) -> None:
    uri = ddp_run.tracking_uri
    restarts = all_values(uri, fsdp_run.mlflow_run_id, "train/resumed_from_step")
    assert len(restarts) == 1, restarts  # the kill happened, and the run came back once
    expected = {
        step: values[-1] for step, values in all_values(uri, ddp_run.mlflow_run_id, "train/loss").items()
    }
    got = all_values(uri, fsdp_run.mlflow_run_id, "train/loss")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    n = lora_size(ddp_run.lora_dir)
    norms = {s: v[-1] for s, v in all_values(uri, ddp_run.mlflow_run_id, "train/grad_norm").items()}
    for step, values in got.items():  # redone steps twice: each value is the DDP run's
        moved = math.sqrt(n) * norms[step] * drift(n, step - 1, LR)
        assert all(abs(v - expected[step]) <= moved + abs(expected[step]) * 2**-24 for v in values), step
    val = all_values(uri, fsdp_run.mlflow_run_id, "val/loss")
    ddp_val = all_values(uri, ddp_run.mlflow_run_id, "val/loss")
    assert sorted(val) == [STEPS] and val[STEPS][-1] == pytest.approx(ddp_val[STEPS][-1], rel=1e-5)
    assert list((fsdp_run.output_dir / "validation" / f"step_{STEPS:08d}").glob("clip*.mp4"))

    # OUTPUT/lora: peft's adapter and diffusers' LoRA file, DDP's files; and the exports from it.
    assert_lora_close(fsdp_run.lora_dir, ddp_run.lora_dir, atol=drift(n, STEPS, LR))
    for run in (ddp_run, fsdp_run):
        export(run.output_dir, "merged", root / f"merged-{run.output_dir.name}")
    merged = [
        load_file(str(root / f"merged-{name}" / "transformer" / "diffusion_pytorch_model.safetensors"))
        for name in ("fsdp", "ddp")
    ]
    assert merged[0].keys() == merged[1].keys()
    for key, value in merged[1].items():
        torch.testing.assert_close(merged[0][key], value, rtol=1e-6, atol=drift(n, STEPS, LR), msg=key)

    # Every worker's shards, in the checkpoint Ray Train registered.
    checkpoint = fsdp_run.checkpoint_dir
    assert checkpoint.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert read_checkpoint_payload(checkpoint)["train"]["world_size"] == 2


def test_fsdp_checkpoint_resumes_on_one_worker(fsdp_run: TrainingResult, root: Path) -> None:
    """Step 2's checkpoint (two workers' shards) resumes a run of one worker (train.resume_from),
    which reshards it on load and keeps the global batch (two micro-batches per step)."""
    start = root / "ray" / "fsdp" / "step_00000002"
    cfg = load_config(
        write_config(
            root, "one-worker", parallel="fsdp", num_workers=1, global_batch_size=2, resume_from=str(start)
        )
    )
    cfg.validate.manifest = ""
    result = run_training(cfg)
    uri = result.tracking_uri
    assert all_values(uri, result.mlflow_run_id, "train/resumed_from_step") == {2: [2.0]}
    losses = all_values(uri, result.mlflow_run_id, "train/loss")
    assert sorted(losses) == [STEPS] and math.isfinite(losses[STEPS][0])
    state = read_checkpoint_payload(result.checkpoint_dir)["train"]
    assert state == {"step": STEPS, "samples_seen": 2 * STEPS, "bad_steps": 0, "world_size": 1}
    assert [p.name for p in (result.checkpoint_dir / "sharded").glob("*.distcp")] == ["__0_0.distcp"]
    assert json.loads((start / "state.json").read_text())["train"]["world_size"] == 2
