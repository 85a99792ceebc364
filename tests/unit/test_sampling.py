"""Sampling: svdray's sampler gives diffusers' own pipeline output, is deterministic with LoRA
dropout, follows the training config's conditioning, and `svdray sample` loads a LoRA's run the
way training loaded it (variant, dtypes) after checking every input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from svdray import cli
from svdray.config import LoraConfig, ModelConfig, config_from_dict
from svdray.data.video import FrameSpec, resize_and_crop
from svdray.models.lora import save_lora
from svdray.models.svd.export import export_merged
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.lora import add_lora
from svdray.models.svd.sampler import (
    SamplingSpec,
    conditioning_pixels,
    load_sampling_models,
    sample_video,
    sampling_spec,
)

LORA = LoraConfig(rank=4, alpha=8, dropout=0.5)


def random_image(seed: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A LoRA with dropout 0.5 and random weights in both halves (a fresh one is a no-op)."""
    unet = add_lora(StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet, LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return save_lora(unet, tmp_path_factory.mktemp("lora") / "lora")


def test_sampler_gives_the_pipeline_output(tiny_pipeline_dir):
    """Same image, seed and settings (guidance, noise augmentation, fps, bucket): svdray's sampler
    and `StableVideoDiffusionPipeline.__call__` give the same frames."""
    models = load_sampling_models(ModelConfig(pretrained=str(tiny_pipeline_dir)), device="cpu")
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    image = random_image(1)
    spec = SamplingSpec(8, 32, 32, fps=9.0, motion_bucket_id=60, noise_aug_strength=0.1, steps=4, seed=3)
    expected = pipe(
        Image.fromarray(image),
        height=32,
        width=32,
        num_frames=8,
        num_inference_steps=4,
        fps=9,
        motion_bucket_id=60,
        noise_aug_strength=0.1,
        min_guidance_scale=1.0,
        max_guidance_scale=3.0,
        decode_chunk_size=8,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).frames[0]
    ours = sample_video(models, image, spec)
    assert ours.shape == (8, 32, 32, 3) and ours.dtype == np.uint8
    np.testing.assert_allclose(ours / 255, expected, atol=1 / 255 + 1e-3)
    # What the reward stage logs of this sampler (its `sample_frames` runs the same loop).
    assert SVDFamily().describe_reward_sampling(spec) == (
        "fps=9 motion_bucket_id=60 noise_aug_strength=0.1, guidance 1->3 over the frames"
    )


def test_lora_dropout_is_off_wherever_it_samples(tiny_pipeline_dir, lora_dir, tmp_path):
    models = load_sampling_models(ModelConfig(pretrained=str(tiny_pipeline_dir)), lora_dir, "cpu")
    assert not any(m.training for m in models.unet.modules())  # peft's new layers too
    image = random_image(2)
    spec = SamplingSpec(8, 32, 32, fps=7.0, motion_bucket_id=127, steps=3)
    first = sample_video(models, image, spec)
    assert np.array_equal(first, sample_video(models, image, spec))

    # A training UNet (LoRA layers in training mode) samples the same video: sampling sets eval.
    train_unet = add_lora(StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet, LORA)
    train_unet.load_state_dict(models.unet.state_dict())
    train_unet.train()
    models.unet = train_unet
    assert np.array_equal(first, sample_video(models, image, spec))

    merged = export_merged(lora_dir, str(tiny_pipeline_dir), tmp_path / "merged")
    merged_models = load_sampling_models(ModelConfig(pretrained=str(merged)), device="cpu")
    from_merged = sample_video(merged_models, image, spec)
    assert np.abs(first.astype(int) - from_merged.astype(int)).max() <= 2
    base = sample_video(load_sampling_models(ModelConfig(pretrained=str(tiny_pipeline_dir))), image, spec)
    assert np.abs(first.astype(int) - base.astype(int)).mean() > 5  # the LoRA does act


def test_sampling_spec_follows_the_training_config(tiny_pipeline_dir, square_clip):
    tree = {
        "model": {"pretrained": str(tiny_pipeline_dir)},
        "data": {"num_frames": 8, "height": 32, "width": 48, "fps": 7.5},
        "svd": {"motion_bucket_id": None, "motion_bucket_scale": 1.5},
        "validate": {"steps": 5, "seed": 4},
        "reward": {"sample_steps": 3},
    }
    cfg = config_from_dict(tree, check_files=False)
    spec = sampling_spec(cfg)
    assert (spec.fps, spec.num_frames, spec.height, spec.width) == (7.5, 8, 32, 48)
    assert spec.motion_bucket_id is None  # training computes it from the clip: so does sampling
    frames = resize_and_crop(
        torch.zeros(8, 3, 32, 48, dtype=torch.uint8).random_(0, 256), FrameSpec(8, 7.5, 32, 48), (0.5, 0.5)
    )
    expected = round(1.5 * frames.numpy().astype(np.float64).std(axis=0, ddof=1).mean())
    assert 1 < expected < 255 and spec.bucket_for(frames) == expected
    assert spec.bucket_for(None) == 127.0  # a still image: SVD's default, logged by the caller
    assert (sampling_spec(cfg, "validate").steps, sampling_spec(cfg, "validate").seed) == (5, 4)
    reward = sampling_spec(cfg, "reward")
    assert (reward.fps, reward.steps) == (7.5, 3)  # reward.fps defaults to the training fps

    tree["svd"]["motion_bucket_id"] = 40
    tree["sample"] = {"fps": 6.0}
    tree["reward"]["fps"] = 5.0
    cfg = config_from_dict(tree, check_files=False)
    assert (sampling_spec(cfg).fps, sampling_spec(cfg).bucket_for(frames)) == (6.0, 40.0)
    assert sampling_spec(cfg, "reward").fps == 5.0


def test_conditioning_image_is_cropped_like_training_not_stretched():
    spec = SamplingSpec(8, 32, 32, fps=7.0, motion_bucket_id=127)
    portrait = random_image(3, (64, 32, 3))
    ours = conditioning_pixels(portrait, spec)
    assert torch.equal(ours, torch.from_numpy(portrait[16:48]).permute(2, 0, 1))  # the centre square
    training = resize_and_crop(
        torch.from_numpy(random_image(4, (48, 80, 3))).permute(2, 0, 1)[None],
        FrameSpec(1, 7.0, 32, 32),
        (0.5, 0.5),
    )[0]
    assert torch.equal(conditioning_pixels(random_image(4, (48, 80, 3)), spec), training)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, tiny_pipeline_dir, lora_dir) -> Path:
    """A training output folder whose base pipeline holds only fp16 variant weight files."""
    root = tmp_path_factory.mktemp("fp16run")
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float16)
    pipe.save_pretrained(root / "pipeline", variant="fp16", safe_serialization=True)
    assert not list((root / "pipeline" / "unet").glob("diffusion_pytorch_model.safetensors"))
    run = root / "run"
    save_lora_copy = run / "lora"
    save_lora_copy.mkdir(parents=True)
    for file in lora_dir.iterdir():
        (save_lora_copy / file.name).write_bytes(file.read_bytes())
    config = {
        "model": {"pretrained": str(root / "pipeline"), "variant": "fp16", "frozen_dtype": "float32"},
        "data": {"num_frames": 6, "height": 32, "width": 32, "fps": 7.0},
        "svd": {"motion_bucket_id": 50},
        "sample": {"steps": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_sample_cli_takes_the_runs_variant_and_conditioning(fp16_run, tmp_path, capsys):
    image = tmp_path / "still.png"
    Image.fromarray(random_image(5, (40, 56, 3))).save(image)
    out = tmp_path / "video.mp4"
    assert (
        cli.main(["sample", "--lora", str(fp16_run / "lora"), "--image", str(image), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "6 frames (32x32, fps=7 motion_bucket_id=50, 2 steps)" in printed
    from decord import VideoReader

    assert len(VideoReader(str(out))) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.png"], "--image"),
        (["--fps", "-3"], "--fps"),
        (["--out", "video.gif"], "--out"),
        (["--lora", "nowhere"], "--lora"),
        (["--steps", "0"], "--steps"),
        (["--height", "36"], "--height: 36 is not a multiple of 8"),
    ],
)
def test_sample_cli_names_the_bad_flag_before_loading(fp16_run, tmp_path, capsys, args, message):
    image = tmp_path / "still.png"
    Image.fromarray(random_image(6)).save(image)
    base = {"--lora": str(fp16_run / "lora"), "--image": str(image), "--out": str(tmp_path / "v.mp4")}
    flags = dict(zip(args[::2], args[1::2], strict=True))
    argv = ["sample"] + [item for key, value in {**base, **flags}.items() for item in (key, value)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
