"""No silently ignored key: each `optim.*` / `speed.*` key and `train.mixed_precision` is read by
the one optimizer builder, scheduler builder, autocast context or model builder that every loop
(training, reward stage, benchmarks) uses, and what is built reflects the key's value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from svdray.config import OptimConfig, SpeedConfig, config_from_dict
from svdray.models.precision import mixed_precision
from svdray.models.speed import KernelAttnProcessor
from svdray.models.svd.family import SVDFamily
from svdray.train.optim import build_lr_scheduler, build_optimizer

CPU = torch.device("cpu")


def built(pipeline_dir, key: str, value, models: bool = False) -> dict:
    tree = {
        "model": {"pretrained": str(pipeline_dir)},
        "data": {"num_frames": 8, "height": 32, "width": 32},
        "lora": {"rank": 2, "alpha": 2},
        "train": {"max_steps": 20},
        "optim": {"warmup_steps": 0},
    }
    section, name = key.split(".")
    tree.setdefault(section, {})[name] = value
    cfg = config_from_dict(tree, check_files=False)
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = build_optimizer(params, cfg.optim, cfg.speed, CPU)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(cfg.train.max_steps):
        params[0].grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    with mixed_precision(cfg.train.mixed_precision, CPU):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
    result = {"optimizer": optimizer, "lrs": lrs, "autocast": autocast}
    if models:
        models = SVDFamily().build_models(cfg, CPU)
        result["frozen"], result["unet"] = models.frozen, models.denoiser
    return result


CASES = {
    "optim.lr": (3e-4, lambda b: b["optimizer"].defaults["lr"] == 3e-4 and b["lrs"][0] == 3e-4),
    "optim.weight_decay": (0.05, lambda b: b["optimizer"].defaults["weight_decay"] == 0.05),
    "optim.betas": ([0.8, 0.95], lambda b: b["optimizer"].defaults["betas"] == (0.8, 0.95)),
    "optim.eps": (1e-6, lambda b: b["optimizer"].defaults["eps"] == 1e-6),
    "optim.warmup_steps": (10, lambda b: b["lrs"][0] == 0 and b["lrs"][5] == pytest.approx(0.5e-4)),
    "optim.schedule": ("constant", lambda b: b["lrs"][1:] == [1e-4] * 20),
    "speed.fused_adamw": (True, lambda b: b["optimizer"].defaults["fused"] is True),
    "speed.attention": (
        "math",
        lambda b: {type(p) for p in b["unet"].attn_processors.values()} == {KernelAttnProcessor},
    ),
    "speed.vae_chunk": (3, lambda b: b["frozen"].vae_chunk == 3),
    "speed.channels_last": (
        True,
        lambda b: b["unet"].conv_in.weight.is_contiguous(memory_format=torch.channels_last),
    ),
    "speed.compile_denoiser": (True, lambda b: b["unet"]._compiled_call_impl is not None),
    "train.mixed_precision": ("bf16", lambda b: b["autocast"] == torch.bfloat16),
}
# What the defaults build: each case above must differ from it, or it would prove nothing.
DEFAULTS = {
    "optim.schedule": lambda b: b["lrs"][10] == pytest.approx(0.5e-4),  # cosine: half-way at half-time
    "speed.fused_adamw": lambda b: b["optimizer"].defaults["fused"] is False,  # null: CUDA only
    "train.mixed_precision": lambda b: b["autocast"] is False,
}
# Read by the loops themselves (gradient clipping), not by a builder; checked in test_train.
LOOP_KEYS = {"optim.max_grad_norm"}


def test_every_optim_and_speed_key_has_a_case():
    keys = {f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)}
    keys |= {f"speed.{f.name}" for f in dataclasses.fields(SpeedConfig)}
    assert keys - LOOP_KEYS <= set(CASES), sorted(keys - LOOP_KEYS - set(CASES))


@pytest.mark.parametrize("key", sorted(CASES))
def test_key_reaches_what_the_loops_build(tiny_pipeline_dir, key):
    value, check = CASES[key]
    needs_models = key.startswith("speed.") and key != "speed.fused_adamw"
    assert check(built(tiny_pipeline_dir, key, value, models=needs_models)), key
    default = dataclasses.asdict(config_from_dict({}, check_files=False))
    section, name = key.split(".")
    baseline = built(tiny_pipeline_dir, key, default[section][name], models=needs_models)
    if key in DEFAULTS:
        assert DEFAULTS[key](baseline), key
    assert not check(baseline), f"{key}: the default builds the same thing, the case proves nothing"
