"""`model.denoiser_dtype: float8` on the tiny Wan transformer (and SVD's UNet): which weights are
stored in float8, that each is its bf16 weight within e4m3's rounding, that the model computes
exactly what a bf16 model with the dequantised weights computes (loss and LoRA gradients), and
that the loss curve of an fp8 run stays within the bound that rounding implies.

The bound: e4m3 keeps 3 mantissa bits, so each stored weight w' = w (1 + d) with |d| <= 2^-4
(e4m3's normal range; below it |w' - w| <= 2^-10 s, s the channel's power-of-two scale). A
perturbation dw of the weights moves the loss, to first order, by sum(dL/dw * dw); bounded by
2^-4 sum |dL/dw * w| over the float8 weights. The two runs' LoRAs also drift apart once they
train; that moves step t's loss by at most sum |dL/dlora * (lora8 - lora16)|, again to first
order. The test allows twice the sum of the two (the factor covers the second-order terms, of
relative size 2^-4 and below, with room).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from svdray.config import ConfigError, config_from_dict
from svdray.models import family_of
from svdray.models.float8 import FLOAT8, Float8Conv2d, Float8Linear, dequantize, quantize
from svdray.models.lora import lora_parameters
from svdray.train.optim import build_optimizer
from tests.support.parallel_runs import NUM_FRAMES, SIZE, batch

CPU = torch.device("cpu")
E4M3_RELATIVE = 2.0**-4  # half a unit in the last of 3 mantissa bits
E4M3_SUBNORMAL = 2.0**-10  # half e4m3's subnormal spacing (2^-9), in units of the scale


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("float8") / "tiny-wan", "i2v", seed=0)


def wan_config(pretrained: Path, dtype: str, **train):
    return config_from_dict(
        {
            "model": {"family": "wan", "pretrained": str(pretrained), "denoiser_dtype": dtype},
            "data": {"num_frames": NUM_FRAMES, "height": SIZE[0], "width": SIZE[1]},
            "lora": {"rank": 4, "alpha": 4, "feed_forward": True},
            "optim": {"lr": 1e-2},
            "train": {"mixed_precision": "bf16", "gradient_checkpointing": True, **train},
        },
        check_files=False,
    )


def build(cfg):
    torch.manual_seed(0)  # the same LoRA initialisation for every model
    return family_of(cfg).build_models(cfg, CPU)


def float8_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear | Float8Conv2d)}


def train_loss(models, cfg, step: int = 1) -> float:
    """One step's loss and backward (the gradients stay on the parameters)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = family_of(cfg).training_loss(
            models.denoiser, models.frozen, batch(step, 0, 0), cfg, torch.Generator().manual_seed(step)
        )
        loss.backward()
    return loss.item()


def loss_and_grads(models, cfg) -> tuple[float, dict[str, torch.Tensor]]:
    loss = train_loss(models, cfg)
    return loss, {n: p.grad for n, p in models.denoiser.named_parameters() if p.grad is not None}


def test_block_linears_are_float8_within_e4m3_rounding(wan_dir):
    bf16 = build(wan_config(wan_dir, "bfloat16")).denoiser
    fp8 = build(wan_config(wan_dir, "float8")).denoiser
    layers = float8_layers(fp8)
    # Every frozen linear of the blocks, peft's base layers included: attention (self, text and
    # image cross-attention) and the FFN, 12 per block; none outside the blocks.
    assert len(layers) == 12 * len(fp8.blocks)
    assert all(name.startswith("blocks.") for name in layers)
    assert {n for n in layers if "base_layer" in n} and not any("lora_" in n for n in layers)
    reference = dict(bf16.named_modules())
    for name, layer in layers.items():
        assert layer.weight.dtype == FLOAT8 and not layer.weight.requires_grad
        scale = layer.weight_scale
        assert scale.dtype == torch.float32 and torch.equal(scale, torch.exp2(torch.log2(scale).round()))
        w = reference[name].weight.float()
        error = (dequantize(layer.weight, scale, torch.float32) - w).abs()
        assert (error <= torch.maximum(E4M3_RELATIVE * w.abs(), E4M3_SUBNORMAL * scale)).all(), name
        assert layer.weight.float().abs().max() <= 448
    # What stays: LoRA float32; norms, biases, embeddings, the head and the modulation as in bf16.
    for name, param in fp8.named_parameters():
        if name.removesuffix(".weight") in layers:
            continue
        assert param.dtype == dict(bf16.named_parameters())[name].dtype, name
        assert param.dtype == torch.float32 if "lora_" in name else param.dtype != FLOAT8
    float8_bytes = sum(m.weight.numel() for m in layers.values())
    bf16_bytes = sum(reference[n].weight.numel() * 2 for n in layers)
    assert float8_bytes == bf16_bytes // 2


def test_float8_model_computes_its_dequantised_weights(wan_dir):
    """Loss and LoRA gradients, bit for bit, of a bf16 model whose weights are the dequantised
    float8 ones: the float8 layers change what is stored, not what is computed from it (the
    backward re-dequantises the saved float8 weight)."""
    fp8_cfg, bf16_cfg = wan_config(wan_dir, "float8"), wan_config(wan_dir, "bfloat16")
    fp8, reference = build(fp8_cfg), build(bf16_cfg)
    modules = dict(reference.denoiser.named_modules())
    for name, layer in float8_layers(fp8.denoiser).items():
        modules[name].weight.data = dequantize(layer.weight, layer.weight_scale, torch.bfloat16)
    loss, grads = loss_and_grads(fp8, fp8_cfg)
    expected_loss, expected_grads = loss_and_grads(reference, bf16_cfg)
    assert loss == expected_loss
    assert grads.keys() == expected_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_float8_loss_curve_stays_within_the_rounding_bound(wan_dir):
    """Four training steps with a bf16 base and with an fp8 base, the same batches and draws."""
    cfgs = {dtype: wan_config(wan_dir, dtype) for dtype in ("bfloat16", "float8")}
    models = {dtype: build(cfg) for dtype, cfg in cfgs.items()}
    optimizers = {
        dtype: build_optimizer(lora_parameters(m.denoiser), cfgs[dtype].optim, cfgs[dtype].speed, CPU)
        for dtype, m in models.items()
    }
    bf16, fp8 = models["bfloat16"].denoiser, models["float8"].denoiser
    # The bf16 model's weights that the fp8 one quantises get gradients (not updated: they are
    # not in its optimizer), for the sensitivity sum |dL/dw * w|.
    weights = [dict(bf16.named_modules())[name].weight for name in float8_layers(fp8)]
    for weight in weights:
        weight.requires_grad_(True)
    lora16 = dict((n, p) for n, p in bf16.named_parameters() if "lora_" in n)
    lora8 = dict((n, p) for n, p in fp8.named_parameters() if "lora_" in n)
    for step in range(1, 5):
        drift = {name: (lora8[name] - lora16[name]).detach() for name in lora16}
        losses = {dtype: train_loss(models[dtype], cfgs[dtype], step) for dtype in models}
        sensitivity = sum((w.grad.float() * w.detach().float()).abs().sum() for w in weights).item()
        moved = sum((lora16[n].grad * drift[n]).abs().sum() for n in lora16).item()
        bound = 2 * (E4M3_RELATIVE * sensitivity + moved)
        gap = abs(losses["float8"] - losses["bfloat16"])
        assert 0 < gap <= bound, (step, gap, bound)
        for weight in weights:
            weight.grad = None
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def test_svd_float8_keeps_its_modulation_and_converts_convolutions(tiny_pipeline_dir):
    cfg = config_from_dict(
        {
            "model": {"pretrained": str(tiny_pipeline_dir), "denoiser_dtype": "float8"},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "lora": {"rank": 4, "alpha": 4},
            "train": {"mixed_precision": "bf16", "gradient_checkpointing": "full"},
        },
        check_files=False,
    )
    unet = family_of(cfg).build_models(cfg, CPU).denoiser
    layers = float8_layers(unet)
    assert any(isinstance(m, Float8Conv2d) for m in layers.values())
    assert not any("time_emb_proj" in n or "time_pos_embed" in n for n in layers)
    assert unet.conv_in.weight.dtype == unet.time_embedding.linear_1.weight.dtype == torch.bfloat16
    assert all(not n.startswith(("conv_in", "conv_out", "time_embedding")) for n in layers)


def test_quantize_maps_each_channel_into_e4m3():
    weight = torch.tensor([[1000.0, -3.0, 0.5], [0.0, 0.0, 0.0], [1e-3, 2e-3, -7e-4]])
    q, scale = quantize(weight)
    assert q.dtype == FLOAT8 and scale.shape == (3, 1)
    assert scale[1].item() == 1.0  # an all-zero channel
    peaks = q.float().abs().amax(dim=1)
    assert peaks[1] == 0 and all(224 < peak <= 448 for peak in peaks[[0, 2]])  # the top binade


def test_float8_needs_bf16_autocast(wan_dir):
    with pytest.raises(ConfigError, match="model.denoiser_dtype"):
        wan_config(wan_dir, "float8", mixed_precision="no")
