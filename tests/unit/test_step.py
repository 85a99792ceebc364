"""The training loss, end to end, against what diffusers' own pipeline and scheduler compute.

`training_loss` is run on a batch of four clips with distinct fps, motion buckets, noise
strengths, sigmas and dropout outcomes, with a hook on the UNet. The expected UNet inputs and
loss are built independently from diffusers' pieces (the pipeline's image preprocessing, CLIP
encoding, VAE conditioning latent and time ids; the EulerDiscreteScheduler's noising, input
scaling, timestep and denoised estimate) with the random draws replayed in training's
documented order. Any single wrong constant, sign, channel order, scaling, random draw or
missing term on the way makes one of these comparisons fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image

from svdray.config import ModelConfig, config_from_dict
from svdray.data.video import motion_score
from svdray.models.precision import mixed_precision
from svdray.models.svd.buckets import motion_bucket_ids
from svdray.models.svd.config import SvdConfig
from svdray.models.svd.family import with_motion_buckets
from svdray.models.svd.loss import encode_batch, training_loss
from svdray.models.svd.pipeline import FrozenModels

BATCH, FRAMES, SIZE = 4, 8, 32
FPS = [5.0, 7.0, 10.0, 24.0]
BUCKETS = [10.0, 60.0, 127.0, 200.0]
# Not the defaults, so that a constant copied from the defaults instead of the config shows.
OBJECTIVE = SvdConfig(p_mean=0.4, p_std=1.3, noise_aug_mean=-2.0, noise_aug_std=0.6, cfg_dropout=0.3)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, (BATCH, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    return video, images


def training_batch(clips) -> dict[str, torch.Tensor]:
    """What the data pipeline hands the loop: uint8 (.., 3, H, W) pixels, fps and bucket per clip."""
    video, images = clips
    return {
        "video": torch.from_numpy(video).permute(0, 1, 4, 2, 3).contiguous(),
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "fps": torch.tensor(FPS),
        "motion_bucket_id": torch.tensor(BUCKETS),
    }


def drop_masks(r: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructPix2Pix: the image embedding is dropped for r < 2p, the image latent for
    p <= r < 3p; both for p <= r < 2p (the sampler's unconditional branch)."""
    return (r >= 2 * p).float(), ((r < p) | (r >= 3 * p)).float()


def seed_with_every_dropout_case(p: float) -> int:
    """A seed whose batch holds all four dropout outcomes (the r draw is the fourth in order)."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        torch.randn(BATCH, generator=g)  # noise strength
        torch.randn(BATCH, FRAMES, 4, SIZE // 2, SIZE // 2, generator=g)  # posterior sample
        torch.randn(BATCH, 3, SIZE, SIZE, generator=g)  # conditioning image noise
        keep = drop_masks(torch.rand(BATCH, generator=g), p)
        if len(set(zip(keep[0].tolist(), keep[1].tolist(), strict=True))) == 4:
            return seed
    raise AssertionError("no seed gives every dropout case")


def expected_step(pipe, clips, seed: int) -> dict:
    """UNet inputs and loss built from diffusers' own pieces, draws replayed in training's order:
    noise strength, posterior sample, conditioning-image noise, dropout r, sigma, noise."""
    video, images = clips
    g = torch.Generator().manual_seed(seed)
    strength = torch.exp(OBJECTIVE.noise_aug_mean + OBJECTIVE.noise_aug_std * torch.randn(BATCH, generator=g))
    with torch.no_grad():
        frames = torch.stack(
            [pipe.video_processor.preprocess([Image.fromarray(f) for f in clip]) for clip in video]
        )
        posterior = pipe.vae.encode(frames.flatten(0, 1)).latent_dist
        mean = posterior.mean.unflatten(0, (BATCH, FRAMES))
        std = posterior.std.unflatten(0, (BATCH, FRAMES))
        x0 = (mean + std * torch.randn(mean.shape, generator=g)) * pipe.vae.config.scaling_factor
        image_noise = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
        keep_embedding, keep_latent = drop_masks(torch.rand(BATCH, generator=g), OBJECTIVE.cfg_dropout)
        sigma = torch.exp(OBJECTIVE.p_mean + OBJECTIVE.p_std * torch.randn(BATCH, generator=g))
        noise = torch.randn(x0.shape, generator=g)

        rows = []
        for i in range(BATCH):
            image = Image.fromarray(images[i])
            embedding = pipe._encode_image(image, "cpu", 1, False) * keep_embedding[i]
            pixels = pipe.video_processor.preprocess(image, height=SIZE, width=SIZE)
            latent = pipe._encode_vae_image(pixels + strength[i] * image_noise[i : i + 1], "cpu", 1, False)
            latent = latent * keep_latent[i]
            # The pipeline's __call__ hands `fps - 1` to _get_add_time_ids ("conditioned on fps-1").
            time_ids = pipe._get_add_time_ids(
                FPS[i] - 1, BUCKETS[i], strength[i].item(), torch.float32, 1, 1, False
            )
            scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            scheduler.set_timesteps(sigmas=[sigma[i].item(), 0.0])
            t = scheduler.timesteps[0]
            noisy = scheduler.add_noise(x0[i : i + 1], noise[i : i + 1], t.reshape(1))
            sample = torch.cat(
                [scheduler.scale_model_input(noisy, t), latent.unsqueeze(1).expand(-1, FRAMES, -1, -1, -1)],
                dim=2,
            )
            rows.append(dict(sample=sample, timestep=t, embedding=embedding, time_ids=time_ids))
            rows[-1].update(scheduler=scheduler, noisy=noisy, x0=x0[i : i + 1], sigma=sigma[i])
    return {"rows": rows, "keep": (keep_embedding, keep_latent)}


class UNetSpy:
    """Records the UNet's inputs and output on its next call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append({"args": args, "kwargs": kwargs, "output": output[0].detach().clone()})

    def close(self):
        self.handle.remove()


def test_training_loss_is_what_diffusers_samples_from(pipe, clips):
    seed = seed_with_every_dropout_case(OBJECTIVE.cfg_dropout)
    expected = expected_step(pipe, clips, seed)
    frozen = FrozenModels.from_pipeline(pipe)
    spy = UNetSpy(pipe.unet)
    try:
        with torch.no_grad():
            loss = training_loss(
                pipe.unet, frozen, training_batch(clips), OBJECTIVE, torch.Generator().manual_seed(seed)
            )
    finally:
        spy.close()
    (call,) = spy.calls
    sample, timestep = call["args"][:2]
    for i, row in enumerate(expected["rows"]):
        torch.testing.assert_close(sample[i : i + 1], row["sample"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(timestep[i], row["timestep"].to(timestep.dtype), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            call["kwargs"]["encoder_hidden_states"][i : i + 1], row["embedding"], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(call["kwargs"]["added_time_ids"][i : i + 1], row["time_ids"])

    # The loss: EDM's weighted error of the scheduler's own denoised estimate, averaged per sample.
    per_sample = []
    for i, row in enumerate(expected["rows"]):
        t = row["scheduler"].timesteps[0]
        denoised = row["scheduler"].step(call["output"][i : i + 1], t, row["noisy"]).pred_original_sample
        weight = (row["sigma"] ** 2 + 1) / row["sigma"] ** 2
        per_sample.append((weight * (denoised - row["x0"]) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=2e-4, atol=1e-6)


def test_every_dropout_case_reaches_the_unet(pipe, clips):
    """The seed's four samples cover keep-both, drop-embedding, drop-latent and drop-both: the
    comparison above checked each case (it fails if a mask is applied to the wrong input)."""
    keep_embedding, keep_latent = expected_step(pipe, clips, seed_with_every_dropout_case(0.3))["keep"]
    assert sorted(zip(keep_embedding.tolist(), keep_latent.tolist(), strict=True)) == [
        (0.0, 0.0),
        (0.0, 1.0),
        (1.0, 0.0),
        (1.0, 1.0),
    ]


def test_encoders_ignore_the_unet_autocast(tiny_pipeline_dir, clips):
    """bf16 frozen encoders under bf16 autocast: the batch the loop encodes equals the cached
    one, which the latent cache computes with no autocast at all, and so do the losses."""
    from svdray.models.svd.cache import SVDCacheEncoder

    model = ModelConfig(pretrained=str(tiny_pipeline_dir), frozen_dtype="bfloat16")
    encoder = SVDCacheEncoder(model)
    video, images = clips
    batch = training_batch(clips)
    cached = encoder.encode(batch["video"], batch["image"], [""] * BATCH)
    cached_batch = {
        "image": batch["image"],
        "fps": batch["fps"],
        "motion_bucket_id": batch["motion_bucket_id"],
        "latent_mean": cached["latent_mean"],
        "latent_std": cached["latent_std"],
        "image_embedding": cached["image_embedding"],
    }
    frozen = FrozenModels(
        encoder.vae, encoder.image_encoder, encoder.feature_extractor, encoder.vae.config.scaling_factor
    )
    unet = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    strength = torch.full((BATCH,), 0.05)
    with mixed_precision("bf16", torch.device("cpu")), torch.no_grad():
        in_loop = encode_batch(frozen, batch, strength, torch.Generator().manual_seed(1))
        from_cache = encode_batch(frozen, cached_batch, strength, torch.Generator().manual_seed(1))
        losses = [
            training_loss(unet, frozen, b, OBJECTIVE, torch.Generator().manual_seed(2))
            for b in (batch, cached_batch)
        ]
    for name in ("latents", "condition_latent", "image_embeddings", "time_ids"):
        ours, theirs = getattr(in_loop, name), getattr(from_cache, name)
        assert ours.dtype == torch.float32, name  # the UNet is handed float32, as at inference
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
    assert losses[0].item() == losses[1].item()


def test_motion_buckets_follow_the_manifest_then_the_config_then_the_clip(tiny_pipeline_dir, clips):
    """The data layer hands each example its clip's motion and the manifest's bucket (-1: none);
    SVD's rule picks the manifest's, else svd.motion_bucket_id, else scale x motion, rounded as
    the clip-derived bucket always was, and that is the time id the UNet gets."""
    video = training_batch(clips)["video"]
    motion = torch.tensor([motion_score(v) for v in video], dtype=torch.float64)
    manifest = torch.tensor([-1.0, 42.0, -1.0, 0.0])
    computed = motion_bucket_ids(motion, manifest, None, 0.5)
    expected = [round(0.5 * v.numpy().astype(np.float64).std(axis=0, ddof=1).mean()) for v in video]
    assert computed.dtype == torch.float32
    assert computed.tolist() == [expected[0], 42.0, expected[2], 0.0]
    assert motion_bucket_ids(motion, manifest, 90, 0.5).tolist() == [90.0, 42.0, 90.0, 0.0]
    # clamped to 1..255, ties rounded half to even like Python's round
    edges = motion_bucket_ids(torch.tensor([0.1, 1e4, 2.5, 3.5]), torch.full((4,), -1.0), None, 1.0)
    assert edges.tolist() == [1.0, 255.0, 2.0, 4.0]

    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    frozen = FrozenModels(pipe.vae.eval(), pipe.image_encoder.eval(), pipe.feature_extractor, 1.0)
    batch = {**training_batch(clips), "motion": motion, "motion_bucket_id": manifest}
    strength = torch.full((BATCH,), 0.05)
    cfg = config_from_dict({"svd": {"motion_bucket_id": None, "motion_bucket_scale": 0.5}}, check_files=False)
    encoded = encode_batch(
        frozen, with_motion_buckets(batch, cfg), strength, torch.Generator().manual_seed(0)
    )
    assert encoded.time_ids[:, 1].tolist() == computed.tolist()
