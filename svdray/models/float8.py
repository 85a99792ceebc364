"""fp8 frozen weights (`model.denoiser_dtype: float8`): the linear and convolution weights of the
denoiser's blocks stored as float8_e4m3fn, one scale per output channel, dequantised to bf16 one
layer at a time for compute. Half the bytes of a bf16 base: what makes Wan 14B's 28 GB base fit
a 40 GB card alone (benchmarks/memory.py counts it).

What is stored: q = round_e4m3(w / s) with s a power of two per output channel, the smallest
that maps the channel's largest |w| into e4m3's range (|q| <= 448). A power of two makes the
division and the dequantisation q * s exact, so the one error is e4m3's rounding: 3 mantissa
bits, |q - w / s| <= 2^-4 |w / s| for |w / s| >= 2^-6 (e4m3's smallest normal), and at most 2^-10
(half its subnormal spacing) below: |w' - w| <= max(2^-4 |w|, 2^-10 s).

What stays as it was (bf16, or float32 where the family keeps it): norms, biases, everything
outside the blocks (embeddings, the head, the time embedding and its modulation), the layers a
family names in `ModelFamily.float8_keep` (e.g. SVD's per-block time-embedding projections), and
the LoRA's own weights (float32, trained).

How: after LoRA injection (peft wraps each targeted layer; its frozen `base_layer` is what gets
quantised, so peft still injects and trains as ever), each such layer's class becomes its float8
subclass in place: module tree, parameter names, LoRA keys and checkpoints do not change. The
weight is a plain float8 `Parameter` (frozen) with a float32 `weight_scale` buffer, not torchao's
float8 tensor subclass, which fails under FSDP2's `fully_shard` (`aten.new_zeros`); FSDP2
shards and gathers plain float8 parameters like any other, DDP leaves frozen ones alone. The
backward keeps the float8 weight (1 byte per weight), not a bf16 copy, and dequantises it again
for the input's gradient: at no time does the whole base exist in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448
COMPUTE_DTYPE = torch.bfloat16


def storage_dtype(denoiser_dtype: str) -> str:
    """The dtype a denoiser loads in for `model.denoiser_dtype` (float8: bf16, then its blocks'
    layers are quantised by `quantize_blocks`)."""
    return "bfloat16" if denoiser_dtype == "float8" else denoiser_dtype


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 power-of-two scale per output channel, broadcastable to it)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    # The smallest power of two s with amax / s <= 448; an all-zero channel gets s = 1.
    exponent = torch.ceil(torch.log2(torch.where(amax > 0, amax / FLOAT8_MAX, torch.ones_like(amax))))
    scale = torch.exp2(exponent)
    return (w / scale).to(FLOAT8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)  # exact: 4 significant bits times a power of two


class _Float8Weight(torch.autograd.Function):
    """y = layer(x) with the dequantised weight; saves the float8 weight for backward, which
    gives the input's gradient only (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, layer):  # noqa: ANN001, ANN205 - autograd's signature
        dtype = compute_dtype(x)
        w = dequantize(weight, scale, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = layer.run(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(weight, scale)
        ctx.layer, ctx.dtype, ctx.input_shape, ctx.input_dtype = layer, dtype, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        weight, scale = ctx.saved_tensors
        w = dequantize(weight, scale, ctx.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = ctx.layer.input_grad(grad.to(ctx.dtype), w, ctx.input_shape)
        return grad_x.to(ctx.input_dtype), None, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 autocast's dtype when it is on (as for any layer under it), else bf16."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return COMPUTE_DTYPE


class Float8Linear(nn.Linear):
    """An `nn.Linear` whose frozen weight is float8 with a per-output-channel scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Weight.apply(x, self.weight, self.weight_scale, self.bias, self)

    def run(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def input_grad(self, grad: torch.Tensor, w: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        return grad @ w


class _Float8Conv:
    """What the float8 convolutions share: the forward through `_conv_forward` (zeros padding,
    checked when quantising) and the input gradient through torch's convolution backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Weight.apply(x, self.weight, self.weight_scale, self.bias, self)

    def run(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, w, bias)

    def input_grad(self, grad: torch.Tensor, w: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        empty = torch.empty(input_shape, dtype=w.dtype, device=w.device)
        grad_x, _, _ = torch.ops.aten.convolution_backward(
            grad,
            empty,
            w,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            [True, False, False],
        )
        return grad_x


class Float8Conv2d(_Float8Conv, nn.Conv2d):
    pass


class Float8Conv3d(_Float8Conv, nn.Conv3d):
    pass


FLOAT8_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Float8Linear,
    nn.Conv2d: Float8Conv2d,
    nn.Conv3d: Float8Conv3d,
}


def quantize_blocks(blocks: list[nn.Module], keep: tuple[str, ...] = ()) -> int:
    """Store the frozen weights of every linear and convolution layer inside `blocks` in float8
    (in place; see the module docstring), except layers whose name inside its block contains one
    of `keep`. Returns how many layers were quantised."""
    count = 0
    for block in blocks:
        for name, module in block.named_modules():
            float8_class = FLOAT8_CLASSES.get(type(module))
            if float8_class is None or module.weight.requires_grad or any(k in name for k in keep):
                continue
            if isinstance(module, nn.Conv2d | nn.Conv3d) and (
                module.padding_mode != "zeros" or isinstance(module.padding, str)
            ):
                continue  # padded outside _conv_forward: left in bf16
            if module.bias is not None and module.bias.requires_grad:
                continue  # a trained bias needs its gradient, which the float8 backward skips
            weight, scale = quantize(module.weight)
            module.__class__ = float8_class
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.register_buffer("weight_scale", scale)
            count += 1
    return count
