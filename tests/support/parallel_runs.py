"""Training runs on gloo ranks that a test spawns (tests/integration/test_sharded_steps.py): the functions
the Ray Train loop calls - the family's `build_models`, `parallelize`, the loop's `update`, the
checkpoint's save and load, the RNG snapshot - on 1, 2 or 4 CPU processes, without Ray.

A job is a config and a list of phases, each a run from fresh models (or a checkpoint), with
its own config sections' keys on top of the job's (`config`):

    {"name": "fsdp", "strategy": "fsdp", "steps": 3, "checkpoint_at": 2, "resume": None,
     "config": {"model": {"denoiser_dtype": "float8"}}}

Each phase writes, from rank 0, into the job's output folder: <name>.json (loss and gradient norm
per step, mean over the workers as the loop logs them), <name>/lora (the family's LoRA folder, as
`OUTPUT/lora` is written), with `checkpoint_at` the checkpoint <name>/step_<k>, and at that step
(or right after `resume` loaded one) <name>/full_state_<k>.safetensors: the LoRA and AdamW state
gathered whole, to compare a resharded resume with. Every rank's batches are fixed by (step,
rank, micro-batch), so any phase feeds the same data as any other at the same step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.support.servers import free_port

NUM_FRAMES, SIZE = 9, (32, 32)  # 9 frames: Wan's 4k + 1 (SVD takes any count)
U32 = 2.0**-24  # float32's unit roundoff
BF16_ULP = 2.0**-7  # a bfloat16 rounding's change, relative, at most (8 significant bits)
ADAM_STEP = 2 * (1 - 0.9) / (1 - 0.999) ** 0.5  # twice AdamW's bound per element (default betas)


def spawn(job: dict[str, Any], out: Path, world_size: int, nodes: list[str] | None = None) -> None:
    """Run `job` on `world_size` spawned gloo ranks (`nodes`: the node each rank says it runs on,
    for HSDP's mesh)."""
    out.mkdir(parents=True, exist_ok=True)
    on_ranks(run_job, world_size, (job, str(out)), nodes)


def on_ranks(target: Any, world_size: int, args: tuple, nodes: list[str] | None = None) -> None:
    """`target(rank, world_size, node, *args)` on `world_size` spawned processes, each a gloo rank
    of one process group; fails naming the exit codes if any rank fails."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    nodes = nodes or [""] * world_size
    ranks = [
        context.Process(target=_rank_main, args=(rank, world_size, port, nodes[rank], target, args))
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=600)
    codes = [process.exitcode for process in ranks]
    assert codes == [0] * world_size, f"ranks exited with {codes}; see the output above"


def _rank_main(rank: int, world_size: int, port: int, node: str, target: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        target(rank, world_size, node, *args)
    finally:
        dist.destroy_process_group()


def run_job(rank: int, world_size: int, node: str, job: dict[str, Any], out: str) -> None:
    for phase in job["phases"]:
        run_phase(job["config"], phase, rank, world_size, node, Path(out))


def batch(step: int, rank: int, micro: int, size: tuple[int, int] = SIZE) -> dict[str, Any]:
    """The data layer's columns for one clip of `size` pixels, fixed by (step, rank, micro-batch)."""
    rng = np.random.default_rng([step, rank, micro])
    video = torch.from_numpy(rng.integers(0, 256, (1, NUM_FRAMES, 3, *size), dtype=np.uint8))
    return {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((1,), 8.0),
        "motion": torch.full((1,), 3.0, dtype=torch.float64),
        "motion_bucket_id": torch.full((1,), -1.0),
        "prompt": ["a red car drives down an empty road"],
    }


def batches(
    first_step: int, last_step: int, rank: int, grad_accum: int, size: tuple[int, int] = SIZE
) -> Iterator[dict[str, Any]]:
    for step in range(first_step, last_step + 1):
        for micro in range(grad_accum):
            yield batch(step, rank, micro, size)


def save_full_state(parallel: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The LoRA and the AdamW state gathered whole (torch's full state dicts), saved by rank 0."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    lora, optim = get_state_dict(parallel.module, optimizer, options=full)
    if parallel.workers.rank == 0:
        flat = {f"lora/{k}": v for k, v in lora.items() if "lora_" in k}
        flat |= {f"optimizer/{k}/{n}": v for k, s in optim["state"].items() for n, v in s.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in flat.items()}, str(path))


def build_rank(tree: dict, strategy: str, rank: int, world_size: int, node: str = "") -> tuple:
    """As the loop builds a worker: the config at this worker count, the family, its models spread
    over the workers (`strategy`, and `train.context_parallel`), the generator; seeded as the
    loop seeds (each worker its own torch seed, the LoRA starting as rank 0's; the generator by
    data-parallel rank)."""
    from svdray.config import config_from_dict
    from svdray.models import family_of
    from svdray.train.parallel import ContextParallel, Workers, data_rank, parallelize

    cfg = config_from_dict(tree, check_files=False)
    cfg.train = cfg.train.at_world_size(world_size)
    family = family_of(cfg)
    device = torch.device("cpu")
    split = ContextParallel.of(cfg.train)
    torch.manual_seed(cfg.train.seed + rank)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + data_rank(rank, split))
    models = family.build_models(cfg, device)
    workers = Workers(rank, world_size, node)
    parallel = parallelize(models.denoiser, family.blocks(models.denoiser), strategy, device, workers, split)
    return cfg, family, models, parallel, generator


def run_phase(tree: dict, phase: dict, rank: int, world_size: int, node: str, out: Path) -> None:
    from svdray.models.lora import lora_parameters
    from svdray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from svdray.train.distributed import mean_across_workers, restore_rng, rng_snapshot
    from svdray.train.optim import build_lr_scheduler, build_optimizer
    from svdray.train.step import update

    tree = {**tree, **{k: {**tree.get(k, {}), **v} for k, v in phase.get("config", {}).items()}}
    cfg, family, models, parallel, generator = build_rank(tree, phase["strategy"], rank, world_size, node)
    optimizer = build_optimizer(lora_parameters(models.denoiser), cfg.optim, cfg.speed, torch.device("cpu"))
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    state = TrainState()
    folder = out / phase["name"]
    if phase.get("resume"):
        state, rng_states = load_checkpoint(phase["resume"], parallel, optimizer, lr_scheduler)
        restore_rng(rng_states, generator, rank)
        save_full_state(parallel, optimizer, folder / f"full_state_{state.step}.safetensors")
    data = batches(state.step + 1, phase["steps"], parallel.data_rank, cfg.train.grad_accum)
    log: dict[str, list[float]] = {"step": [], "loss": [], "grad_norm": []}
    parallel.train()
    while state.step < phase["steps"]:
        loss, grad_norm, good = update(
            parallel, models, family, data, cfg, generator, state.step + 1, optimizer
        )
        assert good, f"step {state.step + 1}: non-finite loss or gradient"
        lr_scheduler.step()
        state.step += 1
        log["step"].append(state.step)
        log["loss"].append(mean_across_workers(loss))
        log["grad_norm"].append(grad_norm.item())
        if state.step == phase.get("checkpoint_at"):
            save_checkpoint(
                folder / f"step_{state.step}",
                parallel.denoiser,
                optimizer,
                lr_scheduler,
                state,
                rng_snapshot(generator, rank, world_size),
                tree,
                lora_state=parallel.lora_state_dict(),
                sharded=parallel.sharded_state(optimizer) if parallel.sharded else None,
                rank=rank,
            )
            save_full_state(parallel, optimizer, folder / f"full_state_{state.step}.safetensors")
    lora = parallel.lora_state_dict()
    if rank == 0:
        family.save_lora(models.denoiser, cfg, folder / "lora", lora)
        (out / f"{phase['name']}.json").write_text(json.dumps(log))
    dist.barrier()


# ------------------------------------------------------------------------------------------
# Comparing runs (the bounds are derived in tests/integration/test_sharded_steps.py's docstring)


def lora_size(folder: Path) -> int:
    """Elements of the LoRA in a LoRA folder."""
    return sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values())


def drift(n: int, steps: int, lr: float) -> float:
    """How far apart the LoRA elements of two runs that differ only in the order of float32 sums
    can be after `steps` clipped AdamW updates at `lr`, for a LoRA of `n` elements."""
    return steps * lr * ADAM_STEP * (n + 3) * U32


def lora_files(actual: Path, expected: Path) -> tuple[dict, dict]:
    """The safetensors files of two LoRA folders ({file name: tensors}), checked to be the same
    files with the same keys and equal adapter configs."""
    files = {
        folder: {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
        for folder in (actual, expected)
    }
    a, e = files[actual], files[expected]
    assert a.keys() == e.keys() and a
    for name in e:
        assert a[name].keys() == e[name].keys(), name
    assert (actual / "adapter_config.json").read_text() == (expected / "adapter_config.json").read_text()
    return a, e


def assert_lora_close(actual: Path, expected: Path, atol: float) -> None:
    """Every safetensors file of two LoRA folders (peft's, and Wan's diffusers file): the same
    keys, each tensor within `atol`; the adapter configs equal."""
    a, e = lora_files(actual, expected)
    for name in e:
        for key in e[name]:
            torch.testing.assert_close(a[name][key], e[name][key], rtol=0, atol=atol, msg=f"{name}: {key}")


def assert_lora_learned_close(actual: Path, expected: Path, atol: float) -> None:
    """Two LoRA folders of runs computed under bf16 autocast: the same files, keys and adapter
    config, and the whole LoRA (every tensor of a file, concatenated) apart by at most `atol`
    elementwise (float32 reduction order: `drift`) plus one bf16 rounding of what was learned,
    BF16_ULP |B|: once two runs' weights differ at all, a rounding of the bf16 compute can go the
    other way (one bf16 ulp, up to 2^-7 relative) and so can the gradient it feeds AdamW, whose
    step passes a relative gradient change on at most 1:1. |B| is the norm of the lora_B tensors:
    they start at zero, so they are all learned, and A's learned part is as large (as many elements,
    AdamW steps of the same size). A whole-vector bound: per element, a gradient near zero can
    change sign with one rounding, and its update with it."""
    a, e = lora_files(actual, expected)
    for name in e:
        keys = sorted(e[name])
        difference = torch.cat([(a[name][k] - e[name][k]).flatten() for k in keys])
        learned = torch.cat([e[name][k].flatten() for k in keys if "lora_B" in k])
        bound = atol * difference.numel() ** 0.5 + BF16_ULP * learned.norm().item()
        assert difference.norm().item() <= bound, (name, difference.norm().item(), bound)


def count_fsdp_step(rank: int, world_size: int, node: str, tree: dict, out: str) -> None:
    """benchmarks/memory.py's count of one Wan step on this rank of a real FSDP2 run (the tiny
    model of `tree`, built and sharded as the loop does): <out>/rank<N>.json."""
    from benchmarks.memory import rank_count, run_wan_step, wan_cached_batch
    from svdray.config import config_from_dict
    from svdray.models import family_of
    from svdray.train.parallel import Workers, parallelize

    cfg = config_from_dict(tree, check_files=False)
    family = family_of(cfg)
    device = torch.device("cpu")
    torch.manual_seed(rank)
    models = family.build_models(cfg, device)
    parallelize(
        models.denoiser, family.blocks(models.denoiser), "fsdp", device, Workers(rank, world_size, node)
    )
    batch = wan_cached_batch(models.denoiser, cfg.data.num_frames, cfg.data.height, cfg.data.width, device)
    step = run_wan_step(models.denoiser, family.blocks(models.denoiser), models.frozen, cfg, batch, device)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rank_count(step, world_size)))


def gradient_step(rank: int, world_size: int, node: str, jobs: list[dict], out: str) -> None:
    """One update's forward and backward (`train.grad_accum` micro-batches, the data of step 1)
    for each job ({"name", "strategy", "config"}), as the loop runs it: rank 0 writes
    <out>/<name>.safetensors with the summed loss, the gradient norm and every LoRA gradient,
    whole (reduced across the workers; gathered from the shards under FSDP2)."""
    from safetensors.torch import save_file

    from svdray.train.step import accumulate_gradients

    for job in jobs:
        cfg, family, models, parallel, generator = build_rank(
            job["config"], job["strategy"], rank, world_size, node
        )
        # The tokens the first self-attention sees on this worker (the whole clip's, or its share).
        tokens: list[int] = []
        attention = family.blocks(models.denoiser)[0].attn1
        attention.register_forward_pre_hook(lambda _, args, seen=tokens: seen.append(args[0].shape[1]))
        parallel.train()
        # As the loop feeds a context-parallel group: its first worker reads, the others get its batches.
        size = (cfg.data.height, cfg.data.width)
        read = batches(1, 1, parallel.data_rank, cfg.train.grad_accum, size) if parallel.reads_data else None
        data = parallel.shared_batches(read)
        loss = accumulate_gradients(parallel, models, family, data, cfg, generator, 1)
        norm = parallel.clip_grad_norm(float("inf"))
        grads = {}
        for name, param in models.denoiser.named_parameters():
            if param.requires_grad:
                grad = param.grad
                grads[f"grad/{name}"] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        if rank == 0:
            tensors = {"loss": loss.reshape(1), "grad_norm": norm.reshape(1), **grads}
            tensors["tokens"] = torch.tensor(tokens)
            save_file(
                {k: v.detach().contiguous() for k, v in tensors.items()}, f"{out}/{job['name']}.safetensors"
            )
        if world_size > 1:
            dist.barrier()


# The runs the tests configure: a norm bound every step exceeds, so clipping (and its reduction
# order) is exercised.
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


def assert_same_run(actual: dict, expected: dict, n: int, rounding_flip: float = 0.0) -> None:
    """Loss curves and gradient norms of two runs within the reduction-order bounds.

    Step 1 starts from the same weights, so both runs compute the same forward and backward and
    differ only in the gradient's reduction order, in any precision. From step 2 on the weights
    differ by `drift`: the loss moves by at most the first-order `moved`, and a rounding of the
    compute may go the other way. `rounding_flip` is what one such rounding changes, relative:
    0 in float32 (the bounds carry float32's roundoff already), BF16_ULP under bf16 autocast,
    allowed once on top of the loss's and the gradient norm's bounds. (Under bf16 autocast,
    measured on an AVX-512 CPU, 2026-12-04: 7.5e-4 for the gradient norm of step 3 and 3.3e-5 for
    the loss of step 2, with the first-order bounds at 2.8e-4 and 2.8e-5.)"""
    assert actual["step"] == expected["step"]
    assert all(norm > MAX_NORM for norm in expected["grad_norm"])  # every step clipped
    for k, (got, want) in enumerate(zip(actual["grad_norm"], expected["grad_norm"], strict=True)):
        flip = rounding_flip if k else 0.0
        assert abs(got - want) <= (n * U32 + flip) * abs(want), (k + 1, got, want)
    for k, (got, want) in enumerate(zip(actual["loss"], expected["loss"], strict=True)):
        moved = n**0.5 * expected["grad_norm"][k] * drift(n, k, LR)
        flip = rounding_flip if k else 0.0
        assert abs(got - want) <= moved + abs(want) * (U32 + flip), (k + 1, got, want, moved)
