"""Memory options: "full" gradient checkpointing and bf16 frozen UNet weights change how much the
step holds, not what it computes; benchmarks/memory.py's count on fake tensors equals the same
count on a real CPU step, and its count of one rank of a sharded Wan run the same count on each
rank of a real FSDP2 step."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory import count_config, count_step
from svdray.config import ConfigError, config_from_dict
from svdray.models.lora import lora_parameters, lora_state_dict
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.loss import training_loss
from tests.support.numerics import BF16_EPS, FLOAT32_EPS, assert_same_vector, cosine, flat, relative_error

CPU = torch.device("cpu")


def tiny_config(pipeline_dir, model=None, **train):
    return config_from_dict(
        {
            "model": {"pretrained": str(pipeline_dir), **(model or {})},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "lora": {"rank": 4, "alpha": 4},
            "svd": {"cfg_dropout": 0.0},
            "train": train,
        },
        check_files=False,
    )


def clip_batch() -> dict[str, torch.Tensor]:
    video = torch.randint(
        0, 256, (1, 8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((1,), 7.0),
        "motion_bucket_id": torch.full((1,), 127.0),
    }


def loss_and_grads(cfg, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same LoRA initialisation every time
    models = SVDFamily().build_models(cfg, CPU)
    frozen, unet = models.frozen, models.denoiser
    unet.train()
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    )
    with context:
        loss = training_loss(unet, frozen, clip_batch(), cfg.svd, torch.Generator().manual_seed(1))
        loss.backward()
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    return loss.detach(), dict(zip(names, [p.grad for p in lora_parameters(unet)], strict=True))


def test_full_checkpointing_same_loss_gradients_and_names(tiny_pipeline_dir):
    loss, grads = loss_and_grads(tiny_config(tiny_pipeline_dir))
    full_loss, full_grads = loss_and_grads(tiny_config(tiny_pipeline_dir, gradient_checkpointing="full"))
    assert torch.equal(full_loss, loss)
    assert full_grads.keys() == grads.keys()  # same parameter names: LoRA files and checkpoints unchanged
    # The same ops recomputed on the same kernels: equal but for the order in which gradient
    # contributions may be accumulated (a few float32 epsilons).
    assert_same_vector(full_grads, grads, rtol=8 * FLOAT32_EPS)

    unet = (
        SVDFamily().build_models(tiny_config(tiny_pipeline_dir, gradient_checkpointing="full"), CPU).denoiser
    )
    plain = SVDFamily().build_models(tiny_config(tiny_pipeline_dir), CPU).denoiser
    assert lora_state_dict(unet).keys() == lora_state_dict(plain).keys()
    assert [n for n, _ in unet.named_modules()] == [n for n, _ in plain.named_modules()]


def test_full_checkpointing_saves_less_than_diffusers_own(tiny_pipeline_dir):
    """The temporal blocks diffusers leaves out hold most of the activations: "full" keeps fewer."""
    saved = {}
    for mode in (False, True, "full"):
        cfg = tiny_config(tiny_pipeline_dir, gradient_checkpointing=mode)
        saved[mode] = count_config(cfg)
    assert saved[False]["checkpointed_regions"] == 0
    assert saved["full"]["checkpointed_regions"] > saved[True]["checkpointed_regions"] > 0
    assert saved["full"]["saved_bytes"] < saved[True]["saved_bytes"] < saved[False]["saved_bytes"]
    assert saved["full"]["activations_gib"] < saved[True]["activations_gib"] < saved[False]["activations_gib"]


def test_bf16_unet_weights_match_float32_weights(tiny_pipeline_dir):
    cfg32 = tiny_config(tiny_pipeline_dir, mixed_precision="bf16")
    cfg16 = tiny_config(tiny_pipeline_dir, {"denoiser_dtype": "bfloat16"}, mixed_precision="bf16")
    unet = SVDFamily().build_models(cfg16, CPU).denoiser
    dtypes = {n: p.dtype for n, p in unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}

    # Three runs of one step: float32 (the reference), float32 weights under bf16 autocast, bf16
    # frozen weights under bf16 autocast. Autocast already rounds every matmul and convolution
    # operand to bf16 (the same bf16 weights the bf16 run stores); the bf16 run adds one rounding
    # of the norm and bias parameters (relative 2^-9). So storing the base in bf16 may add at
    # most as much error again as autocast itself carries: at most twice autocast's error, as one
    # vector (some LoRA tensors get only rounding noise, see tests/support/numerics.py). The
    # reference error itself grows with the ops a gradient passes (forward and backward, a few
    # dozen here): it stays under 32 bf16 epsilons (1/8), a bound that keeps a broken autocast out.
    reference_loss, reference = loss_and_grads(tiny_config(tiny_pipeline_dir))
    loss, grads = loss_and_grads(cfg32, autocast=True)
    loss16, grads16 = loss_and_grads(cfg16, autocast=True)
    assert all(g.dtype == torch.float32 for g in grads16.values())
    assert list(grads16) == list(grads) == list(reference)
    autocast_error = relative_error(flat(grads), flat(reference))
    bf16_error = relative_error(flat(grads16), flat(reference))
    assert 0 < autocast_error <= 32 * BF16_EPS, autocast_error
    assert bf16_error <= 2 * autocast_error, (bf16_error, autocast_error)
    assert cosine(flat(grads16), flat(reference)) >= 1 - 2 * (32 * BF16_EPS) ** 2
    for name, grad in reference.items():  # every LoRA tensor that learns in float32 learns in bf16
        assert grad.norm() == 0 or grads16[name].norm() > 0, name
    # The loss is one forward (no backward): its relative error is a few bf16 epsilons.
    assert abs(loss - reference_loss) <= 8 * BF16_EPS * reference_loss
    assert abs(loss16 - reference_loss) <= 2 * abs(loss - reference_loss) + 8 * FLOAT32_EPS * reference_loss


def test_bf16_unet_weights_need_bf16_autocast(tiny_pipeline_dir):
    with pytest.raises(ConfigError, match="model.denoiser_dtype"):
        tiny_config(tiny_pipeline_dir, {"denoiser_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        tiny_config(tiny_pipeline_dir, gradient_checkpointing="some")


@pytest.mark.parametrize("cached", [False, True])
def test_fake_count_equals_the_real_cpu_count(tiny_pipeline_dir, cached):
    """The benchmark's count on fake tensors (meta-built models, no data) against the same counting
    code over a real CPU step with real weights: the same bytes, item by item."""
    cfg = tiny_config(
        tiny_pipeline_dir,
        {"denoiser_dtype": "bfloat16"},
        mixed_precision="bf16",
        gradient_checkpointing="full",
    )
    fake = count_config(cfg, cached)
    models = SVDFamily().build_models(cfg, CPU)
    frozen, unet = models.frozen, models.denoiser
    real = count_step(frozen, unet, cfg, cached, CPU)
    assert real["checkpointed_regions"] == fake["checkpointed_regions"] > 0
    assert real["weights_bytes"] == fake["weights_bytes"]
    for key in ("lora_bytes", "lora_grad_bytes", "adamw_state_bytes", "saved_bytes", "recompute_peak_bytes"):
        assert real[key] > 0 and real[key] == pytest.approx(fake[key], rel=0.1), key
    for key in ("encode_peak_gib", "activations_gib", "estimated_peak_gib"):
        assert real[key] > 0 and real[key] == pytest.approx(fake[key], rel=0.1), key
