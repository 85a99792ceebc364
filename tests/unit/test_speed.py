"""The `speed.*` options change how the step runs, never what it computes."""

from __future__ import annotations

import pytest
import torch

from svdray.config import ConfigError, config_from_dict
from svdray.models.lora import lora_parameters, lora_state_dict, save_lora
from svdray.models.speed import KernelAttnProcessor
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.loss import encode_batch, training_loss
from tests.support.numerics import FLOAT32_REORDER_RTOL, assert_same_vector

CPU = torch.device("cpu")


def tiny_config(pipeline_dir, **speed):
    return config_from_dict(
        {
            "model": {"pretrained": str(pipeline_dir)},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "lora": {"rank": 4, "alpha": 4},
            "svd": {"cfg_dropout": 0.0},
            "speed": speed,
        },
        check_files=False,
    )


def clip_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    video = torch.randint(
        0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((2,), 7.0),
        "motion_bucket_id": torch.full((2,), 127.0),
    }


def loss_and_grads(pipeline_dir, **speed) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cfg = tiny_config(pipeline_dir, **speed)
    torch.manual_seed(0)  # the same LoRA initialisation every time
    models = SVDFamily().build_models(cfg, CPU)
    frozen, unet = models.frozen, models.denoiser
    loss = training_loss(unet, frozen, clip_batch(), cfg.svd, torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), [p.grad for p in lora_parameters(unet)]


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_attention_kernel_gives_the_same_loss_and_gradients(tiny_pipeline_dir, kernel):
    loss, grads = loss_and_grads(tiny_pipeline_dir)
    kernel_loss, kernel_grads = loss_and_grads(tiny_pipeline_dir, attention=kernel)
    # Another attention kernel sums in another order (flash: blockwise online softmax): float32
    # agreement, the gradient as one vector (tests/support/numerics.py).
    torch.testing.assert_close(kernel_loss, loss, rtol=1e-5, atol=0)
    assert_same_vector(kernel_grads, grads, rtol=FLOAT32_REORDER_RTOL)

    models = SVDFamily().build_models(tiny_config(tiny_pipeline_dir, attention=kernel), CPU)

    frozen, unet = models.frozen, models.denoiser
    for model in (unet, frozen.vae):
        kernels = {(type(p), p.kernel) for p in model.attn_processors.values()}
        assert kernels == {(KernelAttnProcessor, kernel)}


def test_vae_chunk_and_channels_last_do_not_change_the_result(tiny_pipeline_dir):
    loss, grads = loss_and_grads(tiny_pipeline_dir)
    other_loss, other_grads = loss_and_grads(tiny_pipeline_dir, vae_chunk=3, channels_last=True)
    torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=0)
    assert_same_vector(other_grads, grads, rtol=FLOAT32_REORDER_RTOL)

    models = SVDFamily().build_models(tiny_config(tiny_pipeline_dir, vae_chunk=3, channels_last=True), CPU)

    frozen, unet = models.frozen, models.denoiser
    assert frozen.vae_chunk == 3
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert frozen.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # 16 frames in chunks of 3 and of 16 (one call): the same posterior.
    strength = torch.full((2,), 0.02)
    chunked = encode_batch(frozen, clip_batch(), strength, torch.Generator().manual_seed(0))
    frozen.vae_chunk = 16
    whole = encode_batch(frozen, clip_batch(), strength, torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=1e-5, atol=1e-5)


def test_compiled_unet_keeps_parameter_names(tiny_pipeline_dir, tmp_path):
    """`unet.compile()` compiles in place: LoRA saving and checkpoints see the same names
    (torch.compile(unet) would prefix them all with `_orig_mod.`)."""
    cfg = tiny_config(tiny_pipeline_dir)
    plain = SVDFamily().build_models(cfg, CPU).denoiser
    compiled = SVDFamily().build_models(tiny_config(tiny_pipeline_dir, compile_denoiser=True), CPU).denoiser
    assert isinstance(compiled, type(plain))
    assert lora_state_dict(compiled).keys() == lora_state_dict(plain).keys()
    assert (save_lora(compiled, tmp_path / "lora") / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("speed", "message"),
    [
        ({"attention": "fast"}, "speed.attention"),
        ({"vae_chunk": 0}, "speed.vae_chunk"),
        ({"turbo": True}, "speed.turbo"),
    ],
)
def test_bad_speed_options_name_the_key(tiny_pipeline_dir, speed, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tiny_pipeline_dir, **speed)
