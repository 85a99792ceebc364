"""The training loop each Ray Train worker runs, top to bottom.

load the pipeline -> freeze VAE and CLIP -> LoRA on the UNet -> DDP -> AdamW + schedule
-> restore the latest checkpoint, if any -> for each step: accumulate gradients over
micro-batches, clip, update, report metrics, checkpoint every `checkpoint_every` steps
-> save the final LoRA
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler

from svdray.config import Config, config_from_dict
from svdray.model.lora import add_lora, lora_parameters, save_lora
from svdray.model.pipeline import load_pipeline
from svdray.tracking import MetricWriter
from svdray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from svdray.train.speed import apply_speed_options
from svdray.train.step import FrozenModels, training_loss

logger = logging.getLogger("svdray.train")

BATCH_COLUMNS = ("video", "image", "fps", "motion_bucket_id")


def build_models(cfg: Config, device: torch.device) -> tuple[FrozenModels, torch.nn.Module]:
    """Frozen VAE + image encoder in `model.frozen_dtype`, and the float32 UNet with LoRA."""
    pipe = load_pipeline(cfg.model.pretrained, "float32", cfg.model.variant, cfg.model.revision)
    frozen_dtype = getattr(torch, cfg.model.frozen_dtype)
    for module in (pipe.vae, pipe.image_encoder):
        module.requires_grad_(False).eval().to(device, frozen_dtype)
    unet = add_lora(pipe.unet, cfg.lora).to(device)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    frozen = FrozenModels(
        pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.vae.config.scaling_factor
    )
    frozen, unet = apply_speed_options(frozen, unet, cfg.speed, device)
    return frozen, unet


def batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs from this worker's Ray Data shard, uint8 pixels moved to the device as is."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
        yield {k: torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in BATCH_COLUMNS}


def rng_snapshot(generator: torch.Generator, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Every worker's RNG states, gathered on all ranks (rank 0 writes them into the checkpoint)."""
    mine = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    gathered = [mine]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    return {f"rank{r}.{name}": state for r, states in enumerate(gathered) for name, state in states.items()}


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, rank: int) -> bool:
    if f"rank{rank}.noise" not in states:
        return False  # the world size changed: keep the fresh per-rank seeds
    torch.set_rng_state(states[f"rank{rank}.torch"])
    generator.set_state(states[f"rank{rank}.noise"])
    if torch.cuda.is_available() and f"rank{rank}.cuda" in states:
        torch.cuda.set_rng_state(states[f"rank{rank}.cuda"])
    return True


def mean_across_workers(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= dist.get_world_size()
    return value.item()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"], check_files=False)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    # All training randomness (sigmas, noise, augmentation, dropout masks) comes from this
    # generator, so a checkpoint of its state makes resumed steps draw the same numbers.
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + rank)

    frozen, unet = build_models(cfg, device)
    raw_unet = unet
    unet = ray.train.torch.prepare_model(unet, move_to_device=False)

    optimizer = torch.optim.AdamW(
        lora_parameters(raw_unet),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda",
    )
    lr_scheduler = get_scheduler(
        "cosine" if cfg.optim.schedule == "cosine" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state, rng_states = load_checkpoint(ckpt_dir, raw_unet, optimizer, lr_scheduler)
        restore_rng(rng_states, generator, rank)
        if rank == 0:
            logger.info("resumed from step %d (%d samples seen)", state.step, state.samples_seen)

    writer = MetricWriter(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    # The driver already dropped the examples consumed before `loop_config["data_skip"]`;
    # anything consumed since (the checkpoint is newer than the driver's view) is skipped here.
    skip_micro_batches = (state.samples_seen - loop_config["data_skip"]) // (
        cfg.train.batch_size * world_size
    )
    data = batches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, device)
    for _ in range(max(skip_micro_batches, 0)):
        next(data)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and cfg.train.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    unet.train()
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.train.grad_accum):
            try:
                batch = next(data)
            except StopIteration:
                raise RuntimeError(
                    f"the data ran out at step {state.step}: too many clips failed to decode"
                ) from None
            # DDP all-reduces gradients only on the last micro-batch of an update.
            sync = micro == cfg.train.grad_accum - 1 or not hasattr(unet, "no_sync")
            with autocast, contextlib.nullcontext() if sync else unet.no_sync():
                loss = training_loss(unet, frozen, batch, cfg.objective, generator) / cfg.train.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(raw_unet), cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += global_batch
        elapsed = time.perf_counter() - started

        loss_value = mean_across_workers(loss_sum)
        metrics = {
            "loss": loss_value,
            "lr": lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "samples_per_s": global_batch / elapsed,
            "frames_per_s": global_batch * cfg.data.num_frames / elapsed,
            "step": state.step,
        }
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss {loss_value} at step {state.step}")
        if writer and state.step % cfg.train.log_every == 0:
            writer.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
            logger.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.2f samples/s",
                state.step,
                cfg.train.max_steps,
                loss_value,
                metrics["lr"],
                metrics["grad_norm"],
                metrics["samples_per_s"],
            )

        is_last = state.step == cfg.train.max_steps
        rngs = (
            rng_snapshot(generator, rank, world_size)
            if is_last or state.step % cfg.train.checkpoint_every == 0
            else None
        )
        if rngs is not None:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(tmp, raw_unet, cfg.lora, optimizer, lr_scheduler, state, rngs)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{state.step:08d}")
        elif state.step % cfg.train.log_every == 0:
            ray.train.report(metrics)

    if rank == 0:
        save_lora(raw_unet, cfg.lora, Path(cfg.output_dir) / "lora")
    if cfg.train.save_worker_loras:
        save_lora(raw_unet, cfg.lora, Path(cfg.output_dir) / "workers" / f"rank{rank}")
