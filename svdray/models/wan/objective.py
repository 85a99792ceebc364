"""Wan's objective: rectified flow / flow matching, as its sampler integrates it.

With clean normalised latents x0, noise eps and sigma in [0, 1]:
    noisy  = (1 - sigma) * x0 + sigma * eps
    target = eps - x0                           (the velocity; the scheduler steps x += (s' - s) v)
    t      = sigma * num_train_timesteps        (what the pipeline passes as `timestep`; the
                                                UniPC scheduler the checkpoints ship truncates
                                                it to an integer, less than one step away)
Sigmas are drawn from a density over u in [0, 1] (uniform or logit-normal) and then shifted as
the scheduler shifts its grid, sigma = k u / (1 + (k - 1) u). Everything here is a pure function of
its inputs; tests/unit/test_wan.py compares it with the real pipeline's transformer inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from svdray.models.wan.conditioning import WanConditioning
from svdray.models.wan.pipeline import EXPERTS

Density = Literal["uniform", "logit_normal"]
DENSITIES: tuple[str, ...] = ("uniform", "logit_normal")

# --------------------------------------------------------------------------- timesteps


def scheduler_shift(scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler) -> float:
    """The static shift of a flow scheduler (FlowMatchEuler's `shift`, UniPC's `flow_shift`)."""
    config = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if config.use_dynamic_shifting or config.shift_terminal is not None:
            raise ValueError("scheduler: dynamic shifting / shift_terminal are not the static shift Wan uses")
        return float(config.shift)
    if isinstance(scheduler, UniPCMultistepScheduler) and config.use_flow_sigmas:
        return float(config.flow_shift)
    raise ValueError(f"scheduler: {type(scheduler).__name__} is not a flow-matching scheduler")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = k u / (1 + (k - 1) u): the schedulers' shift of their sigma grid."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return sigma / (shift - (shift - 1.0) * sigma)


def expert_sigma_range(boundary_ratio: float | None, expert: str | None) -> tuple[float, float]:
    """Sigmas one expert denoises: `transformer` >= boundary_ratio, `transformer_2` below.

    The pipeline switches on t >= boundary_ratio * num_train_timesteps with t = sigma *
    num_train_timesteps, so the split is at sigma = boundary_ratio.
    """
    if boundary_ratio is None:
        if expert not in (None, "transformer"):
            raise ValueError(f"wan.expert: {expert!r} given but the pipeline has one transformer")
        return 0.0, 1.0
    if expert not in EXPERTS:
        raise ValueError(f"wan.expert: {expert!r} must be one of {EXPERTS} for a two-expert pipeline")
    return (boundary_ratio, 1.0) if expert == "transformer" else (0.0, boundary_ratio)


def expert_for_sigma(boundary_ratio: float | None, sigma: float) -> str:
    """The expert the pipeline runs at this sigma (always `transformer` without a boundary)."""
    if boundary_ratio is None or sigma >= boundary_ratio:
        return "transformer"
    return "transformer_2"


def sigmas_from_quantiles(
    r: torch.Tensor,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Map r in [0, 1) to training sigmas by the inverse CDF of the shifted density on a range.

    u follows the density (uniform, or sigmoid of N(logit_mean, logit_std^2)); sigma =
    shift_sigmas(u). Restricting sigma to [lo, hi] is restricting u to the unshifted bounds, so
    r is mapped into that slice of u's CDF: the exact conditional density, no rejection loop.
    """
    if density not in DENSITIES:
        raise ValueError(f"wan.timestep_density: {density!r} is not one of {DENSITIES}")
    lo, hi = (unshift_sigmas(torch.tensor(b, dtype=torch.float64), shift) for b in sigma_range)
    r = r.double()
    if density == "uniform":
        u = lo + r * (hi - lo)
    else:
        cdf_lo, cdf_hi = (torch.special.ndtr((torch.logit(b) - logit_mean) / logit_std) for b in (lo, hi))
        z = torch.special.ndtri(cdf_lo + r * (cdf_hi - cdf_lo))
        u = torch.sigmoid(logit_mean + logit_std * z)
    return shift_sigmas(u, shift).float()


def sample_sigmas(
    batch: int,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One training sigma per sample (see `sigmas_from_quantiles`), drawn on the generator's device."""
    r = torch.rand(
        batch, generator=generator, dtype=torch.float64, device=generator.device if generator else "cpu"
    )
    return sigmas_from_quantiles(r, density, shift, logit_mean, logit_std, sigma_range).to(device)


def grid_sigmas(
    n: int,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """n fixed sigmas at the density's mid-quantiles (i + 1/2) / n: a validation loss without noise in t."""
    r = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return sigmas_from_quantiles(r, density, shift, logit_mean, logit_std, sigma_range)


# --------------------------------------------------------------------------- objective


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.float().view(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = _per_sample(sigmas, x0)
    return (1.0 - s) * x0.float() + s * noise.float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise.float() - x0.float()


def first_frame_token_mask(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(seq,) float: 0 for tokens of latent frame 0, 1 after, in the transformer's token order."""
    t, h, w = latent_shape[-3:]
    p_t, p_h, p_w = patch_size
    mask = torch.ones(t // p_t, h // p_h, w // p_w)
    mask[0] = 0.0
    return mask.flatten()


def transformer_inputs(
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    cond: WanConditioning,
    expand_timesteps: bool,
    patch_size: tuple[int, int, int],
    num_train_timesteps: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor | None]:
    """The transformer's keyword inputs, as the pipeline's denoising loop builds them.

    "i2v"/"a14b": hidden_states = [noisy | condition] on channels, timestep (B,).
    "ti2v": latent frame 0 replaced by the clean image latent, timestep (B, seq) with 0 on
    frame 0's tokens. Tensors are cast to the transformer's dtype as the pipeline casts them;
    the timestep stays float32.
    """
    t = sigmas.float().to(noisy.device) * num_train_timesteps
    if expand_timesteps:
        frame_mask = torch.ones_like(noisy[:1, :1])
        frame_mask[:, :, 0] = 0.0
        hidden = (1.0 - frame_mask) * cond.condition.float() + frame_mask * noisy
        token_mask = first_frame_token_mask(noisy.shape, patch_size).to(noisy.device)
        timestep = token_mask.unsqueeze(0) * t.unsqueeze(1)
    else:
        hidden = torch.cat([noisy, cond.condition.float()], dim=1)
        timestep = t
    image = cond.image_embeds.to(dtype) if cond.image_embeds is not None else None
    return {
        "hidden_states": hidden.to(dtype),
        "timestep": timestep,
        "encoder_hidden_states": cond.prompt_embeds.to(dtype),
        "encoder_hidden_states_image": image,
    }


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, expand_timesteps: bool) -> torch.Tensor:
    """Per-sample MSE in float32. TI2V leaves latent frame 0 out: its input is the clean image at
    timestep 0 and the sampler overwrites whatever the model predicts there."""
    err = (pred.float() - target.float()) ** 2
    if expand_timesteps:
        err = err[:, :, 1:]
    return err.flatten(1).mean(dim=1)


def training_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: WanConditioning,
    expand_timesteps: bool,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Per-sample rectified-flow loss of one expert for clean latents x0, noise and sigmas.

    `transformer` is a `WanTransformer3DModel`, or the DDP wrapper training calls it through."""
    model = getattr(transformer, "module", transformer)  # DDP keeps the model as .module
    inputs = transformer_inputs(
        noisy_latents(x0, noise, sigmas),
        sigmas,
        cond,
        expand_timesteps,
        tuple(model.config.patch_size),
        num_train_timesteps,
        model.dtype,
    )
    pred = transformer(**inputs, return_dict=False)[0]
    return flow_matching_loss(pred, velocity_target(x0, noise), expand_timesteps)
