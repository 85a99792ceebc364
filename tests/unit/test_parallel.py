"""`train.parallel` on real gloo ranks (spawned processes, no Ray), tiny Wan and tiny SVD: FSDP2 and
HSDP compute DDP's loss curve and LoRA; a sharded checkpoint resumes exactly, also on another
worker count; the LoRA folder a sharded run writes is DDP's, file by file.

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
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdray.config import ConfigError, config_from_dict
from svdray.train.parallel import node_grid
from tests.support.parallel_runs import (
    NUM_FRAMES,
    SIZE,
    U32,
    assert_lora_close,
    drift,
    lora_size,
    spawn,
)

STEPS, CHECKPOINT_AT, LR, MAX_NORM = 3, 2, 1e-2, 1e-4


def run_config(pretrained: Path, family: str, **model) -> dict:
    return {
        "model": {"family": family, "pretrained": str(pretrained), **model},
        "data": {"num_frames": NUM_FRAMES, "height": SIZE[0], "width": SIZE[1]},
        "lora": {"rank": 4, "alpha": 4, "feed_forward": True},
        # A norm bound every step exceeds: clipping (and its reduction order) is exercised.
        "optim": {"lr": LR, "max_grad_norm": MAX_NORM},
        "train": {
            "num_workers": 2,
            "grad_accum": 2,  # gradient sync skipped on the first micro-batch of each update
            "gradient_checkpointing": True,
            "max_steps": STEPS,
        },
    }


def log(out: Path, name: str) -> dict[str, list[float]]:
    return json.loads((out / f"{name}.json").read_text())


def assert_same_run(actual: dict, expected: dict, n: int) -> None:
    """Loss curves and gradient norms of two runs within the reduction-order bounds."""
    assert actual["step"] == expected["step"]
    assert all(norm > MAX_NORM for norm in expected["grad_norm"])  # every step clipped
    torch.testing.assert_close(actual["grad_norm"], expected["grad_norm"], rtol=n * U32, atol=0)
    for k, (got, want) in enumerate(zip(actual["loss"], expected["loss"], strict=True)):
        moved = n**0.5 * expected["grad_norm"][k] * drift(n, k, LR)
        assert abs(got - want) <= moved + abs(want) * U32, (k + 1, got, want, moved)


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
    assert_same_run(log(wan_runs, "fsdp"), log(wan_runs, "ddp"), n)
    # OUTPUT/lora: peft's adapter and diffusers' pytorch_lora_weights.safetensors are DDP's files.
    assert_lora_close(wan_runs / "fsdp" / "lora", wan_runs / "ddp" / "lora", atol=drift(n, STEPS, LR))
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
    assert_same_run(log(wan_runs, "fsdp-float8"), log(wan_runs, "ddp-float8"), n)
    assert_lora_close(
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


def test_hsdp_mesh_is_nodes_by_workers() -> None:
    assert node_grid(["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert node_grid(["b", "a", "b", "a"]) == [[0, 2], [1, 3]]  # wherever Ray put the ranks
    with pytest.raises(ValueError, match="same number of workers on every node"):
        node_grid(["a", "a", "a", "b"])


def test_parallel_is_checked_before_anything_starts(tiny_pipeline_dir) -> None:
    tree = run_config(tiny_pipeline_dir, "svd")
    with pytest.raises(ConfigError, match="train.parallel"):
        config_from_dict({**tree, "train": {**tree["train"], "parallel": "zero3"}}, check_files=False)
    with pytest.raises(ConfigError, match="train.parallel: hsdp .* train.placement: pack"):
        config_from_dict(
            {**tree, "train": {**tree["train"], "parallel": "hsdp", "placement": "spread"}}, check_files=False
        )


def test_offloaded_activations_compute_the_same_step(wan_dir) -> None:
    """train.offload_activations keeps the forward's saved tensors in host memory until backward
    (on a GPU; on this CPU the copies are the same bytes): the loss and every LoRA gradient are
    those of the step without it, bit for bit."""
    from svdray.models import family_of
    from svdray.train.parallel import Workers, parallelize
    from svdray.train.step import accumulate_gradients
    from tests.support.parallel_runs import batches

    results = []
    for offload in (False, True):
        tree = run_config(wan_dir, "wan", denoiser_dtype="bfloat16")
        tree["train"] |= {
            "num_workers": 1,
            "grad_accum": 1,
            "mixed_precision": "bf16",
            "offload_activations": offload,
        }
        cfg = config_from_dict(tree, check_files=False)
        family = family_of(cfg)
        torch.manual_seed(0)
        models = family.build_models(cfg, torch.device("cpu"))
        parallel = parallelize(
            models.denoiser, family.blocks(models.denoiser), "ddp", torch.device("cpu"), Workers()
        )
        loss = accumulate_gradients(
            parallel, models, family, batches(1, 1, 0, 1), cfg, torch.Generator().manual_seed(0), 1
        )
        grads = {n: p.grad for n, p in models.denoiser.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (loss, grads), (offloaded_loss, offloaded_grads) = results
    assert torch.equal(offloaded_loss, loss) and grads.keys() == offloaded_grads.keys() and grads
    assert all(torch.equal(offloaded_grads[n], g) for n, g in grads.items())
