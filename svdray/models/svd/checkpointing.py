"""Gradient checkpointing of the SVD UNet, including what diffusers leaves out.

diffusers' `enable_gradient_checkpointing` on `UNetSpatioTemporalConditionModel` checkpoints the
ResNet blocks and, inside each `TransformerSpatioTemporalModel`, only the spatial
`transformer_blocks`: the temporal blocks, `time_mixer`, `norm` and the projections keep their
activations, and at 25 x 72 x 128 latents they are most of the step's memory
(benchmarks/memory.py counts them). "full" also checkpoints each `TransformerSpatioTemporalModel`
as a whole and each temporal block inside it (nested, so recomputing one needs the activations of
one block at a time), by wrapping their `forward` in place: the module tree and the parameter
names do not change, so LoRA saving, checkpoints and exports are the same.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.utils.checkpoint
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

CheckpointMode = bool | Literal["full"]

# Modules whose activations diffusers does not checkpoint, wrapped by "full".
FULL_CHECKPOINT_TYPES = (TransformerSpatioTemporalModel, TemporalBasicTransformerBlock)


def checkpoint_forward(module: torch.nn.Module) -> None:
    """Run `module`'s forward under `torch.utils.checkpoint` whenever gradients are on.

    Non-reentrant checkpointing, as diffusers uses: keyword arguments pass through and nesting
    inside another checkpointed region works. No-grad calls (validation, sampling) run as before.
    """
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if torch.is_grad_enabled():
            # Looked up at call time (as diffusers does), so benchmarks/memory.py can count regions.
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed


def enable_checkpointing(unet: torch.nn.Module, mode: CheckpointMode) -> None:
    """`train.gradient_checkpointing`: false, true (diffusers' own) or "full" (diffusers' plus the
    temporal blocks and the transformer models' projections and time mixers)."""
    if not mode:
        return
    unet.enable_gradient_checkpointing()
    if mode == "full":
        for module in unet.modules():
            if isinstance(module, FULL_CHECKPOINT_TYPES):
                checkpoint_forward(module)
