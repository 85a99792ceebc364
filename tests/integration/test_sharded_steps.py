"""`train.parallel` on real gloo ranks (spawned processes, no Ray: tests/support/parallel_runs.py), tiny
Wan and tiny SVD: FSDP2 and HSDP compute DDP's loss curve and LoRA; a sharded checkpoint resumes
exactly, also on another worker count; the LoRA folder a sharded run writes is DDP's, file by file;
benchmarks/memory.py's per-rank count equals a real FSDP2 step's. In the integration tier: each
test spawns 2 or 4 fresh Python processes that import torch and diffusers.

The tolerances come from what differs. DDP and FSDP2 run the same forward and backward on each
worker (the same weights, gathered bit for bit, the same batches and noise); they differ in the
order float32 sums are taken:
- averaging the workers' gradients: with two workers exact either way (x/2 + y/2 = (x + y)/2 in
  binary floating point, and a + b = b + a); with four, sums of four terms in another order,
  within 3 u relative (u = 2^-24, float32's unit roundoff);
- the gradient norm, a sum of n squares (n: the LoRA's elements) per shard then across workers:
  within n u relative.
Every step clips (`optim.max_grad_norm` below the norm), so the norm's error scales the update's
gradient by up to (1 + n u); AdamW's step m / sqrt(v) is invariant to a common scale and bounded
by (1 - beta1) / sqrt(1 - beta2) per element, so the LoRA after k steps moves at most
k * lr * 2 (1 - beta1) / sqrt(1 - beta2) * (n + 3) u per element apart (`drift`), and the loss of
step k + 1, which sees that LoRA, at most |g|_1 <= sqrt(n) |g|_2 times as much (to first order).
That first-order bound is exact arithmetic. The Wan runs compute under bf16 autocast: once the
weights differ at all, a bf16 rounding may go the other way, changing its value by up to 2^-7
relative, so from step 2 on their loss and gradient norm get one such rounding on top, and
their LoRAs are compared as whole vectors within it (`assert_lora_learned_close`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdray.config import config_from_dict
from tests.support.parallel_runs import (
    BF16_ULP,
    CHECKPOINT_AT,
    LR,
    STEPS,
    assert_lora_close,
    assert_lora_learned_close,
    assert_same_run,
    drift,
    log,
    lora_size,
    run_config,
    spawn,
)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("parallel") / "tiny-wan", "i2v", seed=0)


@pytest.fixture(scope="module")
def wan_runs(wan_dir, tmp_path_factory) -> Path:
    """Two workers, bf16 base under bf16 autocast (the GPU configs' precision): DDP; FSDP2 with a
    checkpoint at step 2; FSDP2 resumed from it. Then one worker resumes that checkpoint."""
    out = tmp_path_factory.mktemp("wan-runs")
    tree = run_config(wan_dir, "wan", denoiser_dtype="bfloat16")
    tree["train"]["mixed_precision"] = "bf16"
    checkpoint = out / "fsdp" / f"step_{CHECKPOINT_AT}"
    float8 = {"model": {"denoiser_dtype": "float8"}}
    phases = [
        {"name": "ddp", "strategy": "ddp", "steps": STEPS},
        {"name": "fsdp", "strategy": "fsdp", "steps": STEPS, "checkpoint_at": CHECKPOINT_AT},
        {"name": "resumed", "strategy": "fsdp", "steps": STEPS, "resume": str(checkpoint)},
        {"name": "ddp-resumed", "strategy": "ddp", "steps": STEPS, "resume": str(checkpoint)},
        {"name": "ddp-float8", "strategy": "ddp", "steps": STEPS, "config": float8},
        {"name": "fsdp-float8", "strategy": "fsdp", "steps": STEPS, "config": float8},
    ]
    spawn({"config": tree, "phases": phases}, out, world_size=2)
    one = {"name": "one-worker", "strategy": "fsdp", "steps": CHECKPOINT_AT + 1, "resume": str(checkpoint)}
    spawn({"config": tree, "phases": [one]}, out, world_size=1)
    return out


def test_fsdp_equals_ddp_on_wan(wan_runs: Path) -> None:
    n = lora_size(wan_runs / "ddp" / "lora")
    assert_same_run(log(wan_runs, "fsdp"), log(wan_runs, "ddp"), n, rounding_flip=BF16_ULP)
    # OUTPUT/lora: peft's adapter and diffusers' pytorch_lora_weights.safetensors are DDP's files.
    assert_lora_learned_close(wan_runs / "fsdp" / "lora", wan_runs / "ddp" / "lora", atol=drift(n, STEPS, LR))
    # The checkpoint: rank 0's files and both workers' shards.
    checkpoint = wan_runs / "fsdp" / f"step_{CHECKPOINT_AT}"
    assert {p.name for p in checkpoint.iterdir()} == {"lora", "sharded", "rng.safetensors", "state.json"}
    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    # Its lora/ is the LoRA gathered whole at that step.
    full = load_file(str(wan_runs / "fsdp" / f"full_state_{CHECKPOINT_AT}.safetensors"))
    saved = load_file(str(checkpoint / "lora" / "adapter_model.safetensors"))
    assert len(saved) == len([k for k in full if k.startswith("lora/")]) > 0
    for key, value in full.items():
        if key.startswith("lora/"):
            peft_key = key.removeprefix("lora/").replace(".default.", ".")
            assert torch.equal(saved[peft_key], value), key


def test_float8_base_under_ddp_and_fsdp(wan_runs: Path) -> None:
    """The fp8 base (float8 weights with a float32 scale buffer) trains under both: FSDP2 shards
    and gathers the float8 parameters, DDP leaves them out of its broadcast (gloo has no float8),
    and the two compute the same run. (How close fp8 stays to bf16: tests/unit/test_float8.py.)"""
    n = lora_size(wan_runs / "ddp" / "lora")
    assert_same_run(log(wan_runs, "fsdp-float8"), log(wan_runs, "ddp-float8"), n, rounding_flip=BF16_ULP)
    assert_lora_learned_close(
        wan_runs / "fsdp-float8" / "lora", wan_runs / "ddp-float8" / "lora", atol=drift(n, STEPS, LR)
    )
    assert log(wan_runs, "ddp-float8")["loss"] != log(wan_runs, "ddp")["loss"]  # the base did change


def test_sharded_checkpoint_resumes_exactly(wan_runs: Path) -> None:
    """Stopped after step 2's checkpoint and resumed (new models, the checkpoint loaded, the RNG
    restored): step 3 is the uninterrupted run's, bit for bit."""
    fsdp, resumed = log(wan_runs, "fsdp"), log(wan_runs, "resumed")
    assert resumed["step"] == [STEPS]
    assert resumed["loss"] == fsdp["loss"][-1:] and resumed["grad_norm"] == fsdp["grad_norm"][-1:]
    assert_lora_close(wan_runs / "resumed" / "lora", wan_runs / "fsdp" / "lora", atol=0)
    # What it loaded is what was saved: the LoRA and AdamW state, gathered whole, are equal.
    saved = load_file(str(wan_runs / "fsdp" / f"full_state_{CHECKPOINT_AT}.safetensors"))
    loaded = load_file(str(wan_runs / "resumed" / f"full_state_{CHECKPOINT_AT}.safetensors"))
    assert loaded.keys() == saved.keys() and any(k.endswith("/exp_avg_sq") for k in saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("phase", ["one-worker", "ddp-resumed"])
def test_sharded_checkpoint_resumes_on_another_layout(wan_runs: Path, phase: str) -> None:
    """The checkpoint two FSDP2 workers wrote (each its half of every block) loads into one
    worker, and into two DDP replicas: the LoRA and AdamW state are the two workers' state
    gathered whole, exactly; training goes on from there."""
    saved = load_file(str(wan_runs / "fsdp" / f"full_state_{CHECKPOINT_AT}.safetensors"))
    loaded = load_file(str(wan_runs / phase / f"full_state_{CHECKPOINT_AT}.safetensors"))
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert log(wan_runs, phase)["step"] == [CHECKPOINT_AT + 1]


def test_hsdp_equals_ddp_on_svd(tiny_pipeline_dir, tmp_path) -> None:
    """Four workers on two "nodes" (two each), tiny SVD in float32 with its "full" checkpointing:
    HSDP (FSDP2 within each node, replicated across the two) computes DDP's run."""
    tree = run_config(tiny_pipeline_dir, "svd")
    tree["train"] |= {"num_workers": 4, "gradient_checkpointing": "full", "max_steps": 2}
    tree["svd"] = {"cfg_dropout": 0.0}
    phases = [{"name": name, "strategy": name, "steps": 2} for name in ("ddp", "hsdp")]
    spawn({"config": tree, "phases": phases}, tmp_path, world_size=4, nodes=["a", "a", "b", "b"])
    n = lora_size(tmp_path / "ddp" / "lora")
    assert_same_run(log(tmp_path, "hsdp"), log(tmp_path, "ddp"), n)
    assert_lora_close(tmp_path / "hsdp" / "lora", tmp_path / "ddp" / "lora", atol=drift(n, 2, LR))


def test_wan_rank_count_equals_a_real_fsdp_step(tmp_path):
    """benchmarks/memory.py's count of one rank of a 2-worker FSDP2 run, on fake tensors (the tiny
    Wan transformer built on the meta device, whole: the sharding is arithmetic), against the same
    counting code on each rank of a real 2-process gloo FSDP2 step of the same model: the same
    bytes, item by item, on both ranks (its weights, LoRA, gradient and AdamW shards, the saved
    tensors and the recomputation, the gathered root and block)."""
    from benchmarks.memory import fake_wan_step, rank_count
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline
    from tests.support.parallel_runs import count_fsdp_step, on_ranks

    pipeline = save_tiny_wan_pipeline(tmp_path / "tiny-wan", "i2v", seed=0)
    tree = {
        "model": {"family": "wan", "pretrained": str(pipeline), "denoiser_dtype": "bfloat16"},
        "data": {"num_frames": 9, "height": 32, "width": 32, "cache": True},
        "lora": {"rank": 4, "alpha": 4, "feed_forward": True},
        "train": {
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "num_workers": 2,
            "parallel": "fsdp",
        },
    }
    on_ranks(count_fsdp_step, 2, (tree, str(tmp_path)))
    real = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    fake = rank_count(fake_wan_step(config_from_dict(tree, check_files=False)), 2)

    assert fake["checkpointed_regions"] == 2 and fake["terms"]["gathered"] > 0
    for rank in real:
        assert rank["terms"] == fake["terms"]
        for key in ("weights_by_dtype", "root_bytes", "block_bytes", "saved_bytes", "recompute_peak_bytes"):
            assert rank[key] == fake[key], key
    assert fake["terms"]["weights"] < sum(fake["weights_by_dtype"].values()) * 2  # half, padded
