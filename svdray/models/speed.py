"""Memory and speed options (`speed.*` in the config), applied to the models the loop builds.

Each option changes how the step runs, never what it computes: the same batch and seed give the
same loss up to floating-point reordering. `benchmarks/train_step.py` measures every one of them.

    apply_speed_options(denoiser, vae, cfg.speed)   # end of a family's build_models
    with mixed_precision(cfg.train.mixed_precision, device): loss = family.training_loss(...)

(`speed.fused_adamw` is read by `svdray.train.optim.build_optimizer`, `speed.vae_chunk` by the
family's VAE encode.)
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from svdray.config import SpeedConfig

SDPA_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


class KernelAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention processor, restricted to one SDPA kernel.

    `sdpa_kernel` is a context manager, so the choice is made where attention runs rather than
    around the whole step: the loop needs no change, and an unavailable kernel fails loudly
    ("No available kernel") instead of silently falling back to another one.
    """

    def __init__(self, kernel: str):
        super().__init__()
        self.kernel = kernel
        self.backends = SDPA_BACKENDS[kernel]

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with sdpa_kernel(self.backends):
            return super().__call__(attn, hidden_states, *args, **kwargs)


def set_attention_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Route every attention layer of a diffusers model (denoiser, VAE) through one SDPA kernel."""
    if kernel == "default":
        return
    processors = model.attn_processors
    unexpected = {type(p).__name__ for p in processors.values() if not isinstance(p, AttnProcessor2_0)}
    if unexpected:
        # Another processor (xformers, a custom one) is not SDPA: restricting SDPA would not reach it.
        raise ValueError(f"speed.attention={kernel!r}: {type(model).__name__} uses {sorted(unexpected)}")
    model.set_attn_processor(KernelAttnProcessor(kernel))


def to_channels_last(model: torch.nn.Module) -> None:
    """Convolution weights in channels-last format, so cuDNN runs NHWC kernels.

    Per module, because `model.to(memory_format=torch.channels_last)` fails on the 5-D weights of
    SVD's temporal (Conv3d) layers; those get the 3-D variant of the format.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
        elif isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d)


def apply_speed_options(denoiser: torch.nn.Module, vae: torch.nn.Module, speed: SpeedConfig) -> None:
    """Apply `speed` in place: attention kernel, channels-last weights and `torch.compile` of the
    denoiser (in place, so parameter names, LoRA saving and checkpoints are unchanged). Call
    after LoRA injection and gradient checkpointing."""
    set_attention_kernel(denoiser, speed.attention)
    set_attention_kernel(vae, speed.attention)
    if speed.channels_last:
        to_channels_last(denoiser)
        to_channels_last(vae)
    if speed.compile_denoiser:
        denoiser.compile()
