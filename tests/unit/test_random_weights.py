"""`random_models` (what benchmarks/gpu.py times): the models `build_models` builds, module for
module, with random weights made on the device from the pipeline's configs alone."""

from __future__ import annotations

import shutil

import pytest
import torch

from svdray.config import config_from_dict
from svdray.models import get_family
from svdray.models.base import TrainingModels
from svdray.models.random_weights import empty_parameters, fill_random

CPU = torch.device("cpu")
# (family, tiny layout, frames): Wan2.1's layout (CLIP, rotary buffers) and Wan2.2-TI2V's.
FAMILIES = [("svd", None, 8), ("wan", "i2v", 5), ("wan", "ti2v", 5)]


def tiny_config(family: str, pipeline_dir, frames: int, **model):
    return config_from_dict(
        {
            "model": {"family": family, "pretrained": str(pipeline_dir), **model},
            "data": {"num_frames": frames, "height": 32, "width": 32},
            "lora": {"rank": 4, "alpha": 4},
            "train": {"mixed_precision": "bf16" if model else "no", "gradient_checkpointing": True},
        },
        check_files=False,
    )


def modules(models: TrainingModels) -> dict[str, torch.nn.Module]:
    frozen = models.frozen
    parts = frozen.pipe.components if hasattr(frozen, "pipe") else vars(frozen)
    found = {name: m for name, m in parts.items() if isinstance(m, torch.nn.Module)}
    return {"denoiser": models.denoiser, **found}


@pytest.mark.parametrize("family, layout, frames", FAMILIES)
def test_random_models_are_what_build_models_builds(tmp_path, family, layout, frames):
    saved = get_family(family).save_tiny_pipeline(
        tmp_path / "saved", **({"layout": layout} if layout else {})
    )
    configs_only = shutil.copytree(saved, tmp_path / "configs-only")
    for weights in configs_only.rglob("*.safetensors"):
        weights.unlink()  # random_models reads configs, never weights
    bf16 = {"denoiser_dtype": "bfloat16", "frozen_dtype": "bfloat16"}

    loaded = modules(get_family(family).build_models(tiny_config(family, saved, frames, **bf16), CPU))
    made = modules(get_family(family).random_models(tiny_config(family, configs_only, frames, **bf16), CPU))

    assert made.keys() == loaded.keys()
    for name, module in made.items():
        reference = loaded[name]
        assert [type(m) for m in module.modules()] == [type(m) for m in reference.modules()], name
        params = {n: (p.shape, p.dtype, p.requires_grad, p.device) for n, p in module.named_parameters()}
        assert params == {
            n: (p.shape, p.dtype, p.requires_grad, p.device) for n, p in reference.named_parameters()
        }, name
        buffers = dict(reference.named_buffers())  # rotary tables, position ids: computed, not random
        assert buffers.keys() == dict(module.named_buffers()).keys()
        for n, buffer in module.named_buffers():
            assert torch.equal(buffer, buffers[n]), (name, n)
        for n, p in module.named_parameters():
            assert torch.isfinite(p).all(), (name, n)


@pytest.mark.parametrize("family, layout, frames", FAMILIES)
def test_a_step_on_random_models_is_finite(tmp_path, family, layout, frames):
    saved = get_family(family).save_tiny_pipeline(tmp_path / "tiny", **({"layout": layout} if layout else {}))
    cfg = tiny_config(family, saved, frames)
    models = get_family(family).random_models(cfg, CPU)
    video = torch.randint(0, 256, (1, frames, 3, 32, 32), dtype=torch.uint8)
    batch = {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((1,), 7.0),
        "motion": torch.full((1,), 20.0, dtype=torch.float64),
        "motion_bucket_id": torch.full((1,), 127.0),
        "prompt": ["a cat"],
    }
    loss = get_family(family).training_loss(
        models.denoiser, models.frozen, batch, cfg, torch.Generator().manual_seed(0)
    )
    loss.backward()
    grads = [p.grad for p in models.denoiser.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_fill_random_scales_keeps_ties_and_repeats():
    def build():
        with empty_parameters():
            model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.LayerNorm(128))
            model.register_buffer("steps", torch.arange(4.0))
            model.shared = model[0]  # one module in two places (a tied embedding)
            model.head = torch.nn.Linear(256, 128)
        model.head.weight = model[0].weight  # one parameter in two modules, tied once built
        return model

    model = build()
    assert all(p.is_meta for p in model.parameters()) and not model.steps.is_meta
    fill_random([model], CPU, seed=3)
    assert not any(p.is_meta for p in model.parameters())
    assert model.shared is model[0] and model.head.weight is model[0].weight
    # N(0, 1/fan_in) weights: 32768 draws give the std to about 0.4 %.
    assert model[0].weight.std().item() == pytest.approx(256**-0.5, rel=0.03)
    assert torch.equal(model[0].bias, torch.zeros(128))
    assert torch.equal(model[1].weight, torch.ones(128)) and torch.equal(model[1].bias, torch.zeros(128))
    assert torch.equal(model.steps, torch.arange(4.0))

    again = build()
    fill_random([again], CPU, seed=3)
    assert torch.equal(again[0].weight, model[0].weight)


def test_fill_random_refuses_buffers_without_values():
    with torch.device("meta"):
        norm = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="running_mean"):
        fill_random([norm], CPU)
