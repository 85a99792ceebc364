"""The EDM v-prediction objective, checked against diffusers' EulerDiscreteScheduler: what the
sampler feeds the UNet at a sigma and what it makes of the UNet's output. The conditioning is
checked in test_conditioning.py, the whole training loss in test_step.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image

from svdray.models.svd.objective import (
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


def test_training_sigmas_are_log_normal_per_sample():
    sigma = sample_sigmas(20_000, 0.7, 1.6, torch.Generator().manual_seed(0))
    assert sigma.unique().numel() > 19_900  # one draw per sample (float32 repeats a few)
    assert torch.log(sigma).mean().item() == pytest.approx(0.7, abs=0.04)
    assert torch.log(sigma).std().item() == pytest.approx(1.6, abs=0.04)
