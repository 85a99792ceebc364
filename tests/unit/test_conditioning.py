"""SVD's conditioning as training builds it, against what the real pipeline feeds its UNet.

A hook on the pipeline's UNet records a real sampling run's inputs; `predict_v` is then called
on the scheduler's own latent at that step with the conditioning training computes for the same
image, and a hook on the same UNet must see identical inputs (both guidance branches), for a
batch of two images with distinct sigma, noise strength, fps and motion bucket.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from svdray.data.video import FrameSpec, decode_clip, motion_score, to_model_range
from svdray.models.svd import conditioning as cond
from svdray.models.svd.buckets import motion_bucket_ids
from svdray.models.svd.objective import predict_v

SIZE, FRAMES = 32, 8


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def model_pixels(image: np.ndarray) -> torch.Tensor:
    return to_model_range(torch.from_numpy(image).permute(2, 0, 1)).unsqueeze(0)


def capture_pipeline_step(pipe, image, *, step, fps, bucket, strength, seed, guidance=2.5) -> dict:
    """Run the real pipeline and record, at denoising step `step`, the UNet's inputs and output
    and the scheduler's latent before its input scaling."""
    seen: dict = {"calls": 0}
    scale = pipe.scheduler.scale_model_input

    def scale_and_record(sample, t):
        if seen["calls"] == step:
            seen["latent"] = sample[-1:].clone()  # the conditional half holds the same latent
            seen["sigma"] = pipe.scheduler.sigmas[step].reshape(1)
        return scale(sample, t)

    def hook(module, args, kwargs, output):
        if seen["calls"] == step:
            seen.update(
                sample=args[0].clone(),
                timestep=args[1],
                embeddings=kwargs["encoder_hidden_states"].clone(),
                time_ids=kwargs["added_time_ids"].clone(),
                output=output[0].clone(),
            )
        seen["calls"] += 1

    pipe.scheduler.scale_model_input = scale_and_record
    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(
            Image.fromarray(image),
            height=SIZE,
            width=SIZE,
            num_frames=FRAMES,
            num_inference_steps=4,
            fps=fps,
            motion_bucket_id=bucket,
            noise_aug_strength=strength,
            min_guidance_scale=1.0,
            max_guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    finally:
        handle.remove()
        del pipe.scheduler.scale_model_input
    return seen


def test_predict_v_feeds_the_unet_what_the_pipeline_feeds(pipe):
    cases = [  # distinct sigma (step), noise strength, fps and motion bucket per image
        dict(step=0, fps=7, bucket=90, strength=0.02, seed=11),
        dict(step=2, fps=12, bucket=180, strength=0.3, seed=12),
    ]
    images = [random_image(i) for i in range(len(cases))]
    runs = [capture_pipeline_step(pipe, image, **case) for image, case in zip(images, cases, strict=True)]

    pixels = torch.cat([model_pixels(image) for image in images])
    with torch.no_grad():
        embeddings = cond.clip_image_embeddings(pipe.image_encoder, pipe.feature_extractor, pixels)
        # Each image's noise is the first draw of its own generator, as in the pipeline.
        latents = torch.cat(
            [
                cond.conditioning_latents(
                    pipe.vae,
                    pixels[i : i + 1],
                    torch.tensor([c["strength"]]),
                    torch.Generator().manual_seed(c["seed"]),
                )
                for i, c in enumerate(cases)
            ]
        )
    time_ids = cond.added_time_ids(
        torch.tensor([float(c["fps"]) for c in cases]),
        torch.tensor([float(c["bucket"]) for c in cases]),
        torch.tensor([c["strength"] for c in cases]),
    )
    noisy = torch.cat([run["latent"] for run in runs])
    sigma = torch.cat([run["sigma"] for run in runs])
    assert sigma[0] != sigma[1]

    seen = []
    handle = pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args, kwargs, out[0])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            # The guidance's unconditional branch is training's "both dropped" case.
            unconditional = predict_v(
                pipe.unet, noisy, sigma, torch.zeros_like(latents), torch.zeros_like(embeddings), time_ids
            )
            conditional = predict_v(pipe.unet, noisy, sigma, latents, embeddings, time_ids)
    finally:
        handle.remove()

    for branch, (args, kwargs, out) in enumerate(seen):  # 0: unconditional, 1: conditional
        for i, run in enumerate(runs):
            torch.testing.assert_close(args[0][i], run["sample"][branch], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(args[1][i].float(), run["timestep"].float().reshape(()))
            torch.testing.assert_close(
                kwargs["encoder_hidden_states"][i], run["embeddings"][branch], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(kwargs["added_time_ids"][i], run["time_ids"][branch])
            torch.testing.assert_close(out[i], run["output"][branch], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unconditional, seen[0][2])
    torch.testing.assert_close(conditional, seen[1][2])
    assert runs[0]["time_ids"][1, 0].item() == 6.0  # SVD's fps - 1


def test_clip_embedding_and_image_latent_match_the_pipeline_encoders(pipe):
    image = random_image(5)
    with torch.no_grad():
        expected = pipe._encode_image(Image.fromarray(image), "cpu", 1, False)
        ours = cond.clip_image_embeddings(pipe.image_encoder, pipe.feature_extractor, model_pixels(image))
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        processed = pipe.video_processor.preprocess(Image.fromarray(image), height=SIZE, width=SIZE)
        expected_latent = pipe._encode_vae_image(processed, "cpu", 1, False)
        ours_latent = cond.conditioning_latents(pipe.vae, model_pixels(image), torch.zeros(1))
        torch.testing.assert_close(ours_latent, expected_latent, rtol=1e-4, atol=1e-5)


def test_noise_augmentation_is_per_sample_and_log_normal():
    strength = cond.sample_noise_aug_strength(4000, -3.0, 0.5, torch.Generator().manual_seed(0))
    assert strength.unique().numel() > 3990  # one draw per sample (float32 repeats a few)
    assert torch.log(strength).mean().item() == pytest.approx(-3.0, abs=0.03)
    assert torch.log(strength).std().item() == pytest.approx(0.5, abs=0.03)


def test_each_sample_gets_its_own_noise_strength_in_the_latent():
    """A batch of one image twice, strengths 0 and 1: only the second latent moves from the clean one."""
    from svdray.models.svd.pipeline import build_tiny_pipeline

    vae = build_tiny_pipeline().vae.eval()
    pixels = model_pixels(random_image(7)).expand(2, -1, -1, -1)
    with torch.no_grad():
        clean = cond.conditioning_latents(vae, pixels[:1], torch.zeros(1))
        noisy = cond.conditioning_latents(
            vae, pixels, torch.tensor([0.0, 1.0]), torch.Generator().manual_seed(0)
        )
    torch.testing.assert_close(noisy[0:1], clean)
    assert (noisy[1:] - clean).abs().mean() > 0.05


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_cfg_dropout_frequencies(p):
    keep_embedding, keep_latent = cond.cfg_dropout_masks(200_000, p, torch.Generator().manual_seed(0))
    drop_embedding, drop_latent = keep_embedding == 0, keep_latent == 0
    tolerance = 4 * (p * (1 - p) / 200_000) ** 0.5 + 1e-4  # 4 standard errors
    assert drop_embedding.float().mean().item() == pytest.approx(2 * p, abs=2 * tolerance)
    assert drop_latent.float().mean().item() == pytest.approx(2 * p, abs=2 * tolerance)
    assert (drop_embedding & drop_latent).float().mean().item() == pytest.approx(p, abs=tolerance)
    assert (~drop_embedding & ~drop_latent).float().mean().item() == pytest.approx(
        1 - 3 * p, abs=2 * tolerance
    )


def test_motion_bucket_is_the_scaled_temporal_pixel_std():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (FRAMES, 3, 8, 8), dtype=np.uint8)
    expected = round(2.0 * clip.astype(np.float64).std(axis=0, ddof=1).mean())

    def bucket(frames: np.ndarray, scale: float) -> float:
        motion = torch.tensor([motion_score(torch.from_numpy(frames))], dtype=torch.float64)
        return motion_bucket_ids(motion, torch.tensor([-1.0]), None, scale).item()

    assert bucket(clip, 2.0) == float(min(expected, 255))
    assert bucket(np.repeat(clip[:1], FRAMES, axis=0), 2.0) == 1.0  # a still clip: clamped
    assert bucket(clip, 4.0) == 255.0


def test_the_first_sampled_frame_conditions_the_clip(square_clip, tmp_path):
    """Frame sampling: the conditioning image is the first frame of the sampled window (a random
    start), pixel-for-pixel; an explicit image replaces it, framed by the same crop."""
    spec = FrameSpec(FRAMES, 7.0, 32, 32, "random", "random")
    frames, image = decode_clip(str(square_clip), spec, seed=4)
    assert torch.equal(image, frames[0])
    assert not torch.equal(image, frames[-1])
    still = tmp_path / "still.png"
    Image.fromarray(random_image(9)).save(still)
    _, given = decode_clip(str(square_clip), spec, seed=4, image_path=str(still))
    assert given.shape == (3, 32, 32) and not torch.equal(given, frames[0])


def test_pixels_map_to_the_pipeline_range(pipe):
    image = random_image(8)
    expected = pipe.video_processor.preprocess(Image.fromarray(image), height=SIZE, width=SIZE)
    torch.testing.assert_close(model_pixels(image), expected, rtol=0, atol=1e-6)
