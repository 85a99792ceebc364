"""The training objective and conditioning, checked against diffusers itself: the scheduler the
sampler uses, and the pipeline's own conditioning code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image

from svdray.data.video import to_model_range
from svdray.model import conditioning as cond
from svdray.model.objective import (
    add_noise,
    denoised_from_v,
    edm_preconditioning,
    edm_weighted_loss,
    sample_sigmas,
    v_loss,
    v_target,
)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("step_index", [0, 3, 9, 17, 24])
def test_denoised_estimate_matches_euler_scheduler(tiny_pipeline_dir, step_index):
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    scheduler.set_timesteps(25)
    t = scheduler.timesteps[step_index]
    sigma = scheduler.sigmas[step_index].reshape(1)
    g = torch.Generator().manual_seed(step_index)
    x0 = torch.randn(1, 8, 4, 16, 16, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    noisy = add_noise(x0, noise, sigma)
    v_pred = torch.randn(x0.shape, generator=g)

    # What the UNet is fed: the scheduler's input scaling and its continuous timestep.
    pre = edm_preconditioning(sigma)
    torch.testing.assert_close(scheduler.scale_model_input(noisy, t), pre.c_in * noisy)
    torch.testing.assert_close(t.reshape(1).float(), pre.c_noise.float())

    # What the sampler does with the UNet's output.
    out = scheduler.step(v_pred, t, noisy)
    torch.testing.assert_close(
        out.pred_original_sample, denoised_from_v(noisy, v_pred, sigma), rtol=1e-5, atol=1e-5
    )

    # A perfect prediction of the training target gives back the clean latents in the sampler.
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    scheduler.set_timesteps(25)
    perfect = scheduler.step(v_target(x0, noise, sigma), scheduler.timesteps[step_index], noisy)
    torch.testing.assert_close(
        perfect.pred_original_sample, x0, rtol=1e-4, atol=1e-4 * float(sigma.clamp(min=1))
    )


def test_weighted_x0_loss_equals_v_mse():
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigmas(64, 0.7, 1.6, g)
    x0 = torch.randn(64, 4, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    v_pred = torch.randn(x0.shape, generator=g, dtype=torch.float64).float()
    noisy = add_noise(x0, noise, sigma)
    weighted = edm_weighted_loss(
        denoised_from_v(noisy.double(), v_pred.double(), sigma.double()), x0.double(), sigma
    )
    direct = v_loss(v_pred, v_target(x0, noise, sigma))
    torch.testing.assert_close(weighted.float(), direct, rtol=1e-4, atol=1e-5)
    assert sigma.min() < 0.2 and sigma.max() > 20  # the identity holds across the whole range


def test_conditioning_matches_pipeline_encoders(pipe, image):
    pixels = to_model_range(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)).unsqueeze(0)
    with torch.no_grad():
        expected_embeddings = pipe._encode_image(image, "cpu", 1, False)
        ours = cond.clip_image_embeddings(pipe.image_encoder, pipe.feature_extractor, pixels)
        torch.testing.assert_close(ours, expected_embeddings, rtol=1e-4, atol=1e-5)

        processed = pipe.video_processor.preprocess(image, height=32, width=32)
        expected_latent = pipe._encode_vae_image(processed, "cpu", 1, False)
        ours_latent = cond.conditioning_latents(pipe.vae, pixels, torch.zeros(1))
        torch.testing.assert_close(ours_latent, expected_latent, rtol=1e-4, atol=1e-5)


def test_unet_inputs_match_what_the_pipeline_feeds(pipe, image):
    """Run the real sampler and capture the UNet call: every conditioning tensor and the fps-1
    convention must be what training builds for the same image."""
    captured = {}

    def hook(module, args, kwargs):
        if not captured:
            captured.update(
                sample=args[0].clone(),
                timestep=args[1],
                **{k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)},
            )

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        latents = torch.randn(1, 8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        pipe(
            image,
            height=32,
            width=32,
            num_frames=8,
            num_inference_steps=2,
            fps=7,
            motion_bucket_id=90,
            noise_aug_strength=0.0,
            min_guidance_scale=1.0,
            max_guidance_scale=1.0,
            latents=latents * 1.0,
            output_type="latent",
        )
    finally:
        handle.remove()

    pixels = to_model_range(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)).unsqueeze(0)
    with torch.no_grad():
        embeddings = cond.clip_image_embeddings(pipe.image_encoder, pipe.feature_extractor, pixels)
        latent = cond.conditioning_latents(pipe.vae, pixels, torch.zeros(1))
    time_ids = cond.added_time_ids(torch.tensor([7.0]), torch.tensor([90.0]), torch.tensor([0.0]))
    torch.testing.assert_close(captured["added_time_ids"], time_ids)
    assert captured["added_time_ids"][0, 0].item() == 6.0  # SVD's fps - 1
    torch.testing.assert_close(captured["encoder_hidden_states"], embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        captured["sample"][:, :, 4:], latent.unsqueeze(1).expand(-1, 8, -1, -1, -1), rtol=1e-4, atol=1e-5
    )
    sigma0 = pipe.scheduler.sigmas[0].reshape(1)
    pre = edm_preconditioning(sigma0)
    torch.testing.assert_close(captured["timestep"].reshape(1).float(), pre.c_noise.float())
    # prepare_latents multiplies by init_noise_sigma = sqrt(sigma_max^2 + 1); c_in undoes it.
    torch.testing.assert_close(
        captured["sample"][:, :, :4],
        pre.c_in * latents * pipe.scheduler.init_noise_sigma,
        rtol=1e-4,
        atol=1e-4,
    )


def test_cfg_dropout_follows_instructpix2pix_scheme():
    p = 0.1
    keep_embedding, keep_latent = cond.cfg_dropout_masks(200_000, p, torch.Generator().manual_seed(0))
    drop_embedding, drop_latent = keep_embedding == 0, keep_latent == 0
    assert drop_embedding.float().mean().item() == pytest.approx(2 * p, abs=0.005)
    assert drop_latent.float().mean().item() == pytest.approx(2 * p, abs=0.005)
    assert (drop_embedding & drop_latent).float().mean().item() == pytest.approx(p, abs=0.005)


def test_noise_augmentation_is_per_sample():
    strength = cond.sample_noise_aug_strength(1000, -3.0, 0.5, torch.Generator().manual_seed(0))
    assert strength.unique().numel() == 1000
    assert torch.log(strength).mean().item() == pytest.approx(-3.0, abs=0.05)
    assert torch.log(strength).std().item() == pytest.approx(0.5, abs=0.05)


def test_motion_bucket_grows_with_motion():
    still = torch.zeros(1, 3, 16, 16).uniform_(-0.2, 0.2).expand(8, -1, -1, -1).clone()
    moving = torch.rand(8, 3, 16, 16) * 2 - 1
    assert cond.motion_bucket_from_clip(still, 4.0) == 1.0
    assert cond.motion_bucket_from_clip(moving, 4.0) > 100
