"""EDM-preconditioned v-prediction: the objective SVD was trained with and its sampler assumes.

With clean latents x0, noise eps and sigma:
    noisy    = x0 + sigma * eps
    c_in     = 1 / sqrt(sigma^2 + 1)          (EulerDiscreteScheduler.scale_model_input)
    c_skip   = 1 / (sigma^2 + 1)
    c_out    = -sigma / sqrt(sigma^2 + 1)
    c_noise  = 0.25 * log(sigma)               (the UNet timestep, timestep_type="continuous")
    denoised = c_out * F(c_in * noisy) + c_skip * noisy
The EDM loss w * |denoised - x0|^2 with w = (1 + sigma^2) / sigma^2 equals |F - v|^2 with
v = (eps - sigma * x0) / sqrt(sigma^2 + 1); training uses the v form, which has no 1/sigma^2 to
overflow in low precision. tests/unit/test_objective.py checks both identities against diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Preconditioning:
    c_in: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_noise: torch.Tensor


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim)).to(like.dtype)


def edm_preconditioning(sigma: torch.Tensor) -> Preconditioning:
    return Preconditioning(
        c_in=1.0 / torch.sqrt(sigma**2 + 1.0),
        c_skip=1.0 / (sigma**2 + 1.0),
        c_out=-sigma / torch.sqrt(sigma**2 + 1.0),
        c_noise=0.25 * torch.log(sigma),
    )


def sample_sigmas(
    batch: int,
    p_mean: float,
    p_std: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels, sigma ~ LogNormal(p_mean, p_std), one per sample."""
    return torch.exp(p_mean + p_std * torch.randn(batch, generator=generator, device=device))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x0 + _expand(sigma, x0) * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _expand(sigma, x0)
    return (noise - s * x0) / torch.sqrt(s**2 + 1.0)


def denoised_from_v(noisy: torch.Tensor, v_pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    pre = edm_preconditioning(_expand(sigma, noisy))
    return pre.c_out * v_pred + pre.c_skip * noisy


def edm_weighted_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EDM's weighted x0 loss, per sample. Kept for the identity test; training uses `v_loss`."""
    s = _expand(sigma, x0).float()
    weight = (1.0 + s**2) / s**2
    return (weight * (denoised.float() - x0.float()) ** 2).flatten(1).mean(dim=1)


def v_loss(v_pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the UNet output and the v target, computed in float32."""
    return ((v_pred.float() - v.float()) ** 2).flatten(1).mean(dim=1)


def predict_v(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    condition_latent: torch.Tensor,
    image_embeddings: torch.Tensor,
    time_ids: torch.Tensor,
) -> torch.Tensor:
    """UNet v-prediction for noisy video latents (B, T, C, h, w) at per-sample sigma.

    The input is the scaled noisy latent concatenated over channels with the conditioning latent
    repeated over every frame, as the pipeline builds it.
    """
    pre = edm_preconditioning(sigma)
    frames = noisy.shape[1]
    repeated = condition_latent.unsqueeze(1).expand(-1, frames, -1, -1, -1)
    model_input = torch.cat([_expand(pre.c_in, noisy) * noisy, repeated.to(noisy.dtype)], dim=2)
    return unet(
        model_input,
        pre.c_noise,
        encoder_hidden_states=image_embeddings,
        added_time_ids=time_ids,
        return_dict=False,
    )[0]
