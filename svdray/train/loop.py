"""The training loop each Ray Train worker runs, top to bottom.

load the pipeline -> freeze VAE and CLIP -> LoRA on the UNet -> DDP -> AdamW + schedule
-> restore the latest checkpoint (or the chosen one), if any -> for each step: accumulate
gradients over micro-batches, clip, update unless the loss or gradient is not finite, report
metrics, validate every `validate.every` steps, checkpoint every `checkpoint_every` steps
-> save the final LoRA
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from svdray import tracking
from svdray.config import Config, config_from_dict
from svdray.data.dataset import same_shape_batches
from svdray.data.ledger import find_ledger
from svdray.model.checkpointing import enable_checkpointing
from svdray.model.lora import add_lora, cast_frozen_weights, lora_parameters, save_lora
from svdray.model.pipeline import FrozenModels, load_pipeline, scheduler_config
from svdray.model.precision import mixed_precision, mixed_precision_dtype
from svdray.model.sampler import SamplingModels
from svdray.progress import BoardReporter
from svdray.tracking import MetricWriter, mlflow_metrics
from svdray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from svdray.train.optim import build_lr_scheduler, build_optimizer
from svdray.train.speed import apply_speed_options
from svdray.train.step import training_loss
from svdray.train.upload import report_checkpoint
from svdray.train.validate import load_validation_clips, sample_validation_videos, validation_loss_all
from svdray.train.workers import save_worker_record

logger = logging.getLogger("svdray.train")

# Model inputs a batch may carry: decoded clips ("video") or cached latents (`svdray.data.cache`).
BATCH_COLUMNS = (
    "video",
    "image",
    "fps",
    "motion_bucket_id",
    "latent_mean",
    "latent_std",
    "image_embedding",
)


def build_models(cfg: Config, device: torch.device) -> tuple[FrozenModels, torch.nn.Module]:
    """Frozen VAE + image encoder in `model.frozen_dtype`, and the UNet with float32 LoRA
    weights, its frozen weights in `model.unet_dtype`."""
    pipe = load_pipeline(cfg.model.pretrained, "float32", cfg.model.variant, cfg.model.revision)
    frozen = FrozenModels.from_pipeline(pipe, device, cfg.model.frozen_dtype)
    unet = add_lora(pipe.unet, cfg.lora)
    cast_frozen_weights(unet, getattr(torch, cfg.model.unet_dtype)).to(device)
    enable_checkpointing(unet, cfg.train.gradient_checkpointing)
    frozen, unet = apply_speed_options(frozen, unet, cfg.speed, device)
    return frozen, unet


def batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs from this worker's Ray Data shard, uint8 pixels moved to the device as is.

    Examples arrive one per block and are batched by shape (one aspect-ratio bucket per batch).
    Each batch's clips are recorded in the run's data ledger, so what was fed can be checked.
    """
    context = ray.train.get_context()
    ledger = find_ledger(context.get_experiment_name())
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    for batch in same_shape_batches(blocks, batch_size, BATCH_COLUMNS):
        if ledger is not None:
            # Waited for: a worker that exits right after its last step must not drop it.
            fed = [str(c) for c in batch["clip_id"]], [int(e) for e in batch["epoch"]]
            ray.get(ledger.record_fed.remote(context.get_world_rank(), *fed))
        yield {
            k: torch.from_numpy(batch[k]).to(device, non_blocking=True) for k in BATCH_COLUMNS if k in batch
        }


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


def all_workers_finite(*values: torch.Tensor) -> bool:
    """True only if every value is finite on every worker: all ranks must take the same decision
    about an update, or the DDP replicas would drift apart."""
    bad = torch.zeros((), device=values[0].device)
    for value in values:
        bad += (~torch.isfinite(value.detach())).any().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return bad.item() == 0


def restore_state(
    loop_config: dict[str, Any],
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[TrainState, dict[str, torch.Tensor] | None, str | None]:
    """The run's own latest checkpoint (Ray Train's, after a relaunch or a worker-group restart)
    or else `train.resume_from`, the checkpoint the user chose; a fresh state without either.

    Ray Train V2 dropped `TorchTrainer(resume_from_checkpoint=...)`; its migration guide passes the
    path through `train_loop_config` and loads it when `ray.train.get_checkpoint()` is None. The
    run's own checkpoint wins: it is newer than the one the run started from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state, rng_states = load_checkpoint(ckpt_dir, unet, optimizer, lr_scheduler)
        return state, rng_states, checkpoint.path
    if loop_config.get("resume_from"):
        state, rng_states = load_checkpoint(loop_config["resume_from"], unet, optimizer, lr_scheduler)
        return state, rng_states, loop_config["resume_from"]
    return TrainState(), None, None


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Returns (on rank 0, as `Result.return_value`) {"step", "bad_steps"} and, when the numerical
    guard stopped the run, {"stopped": message}."""
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

    optimizer = build_optimizer(lora_parameters(raw_unet), cfg.optim, cfg.speed, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    state, rng_states, restored_from = restore_state(loop_config, raw_unet, optimizer, lr_scheduler)
    if rng_states is not None:
        restore_rng(rng_states, generator, rank)
    writer = MetricWriter(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    if restored_from and writer:
        logger.info(
            "resumed from %s: step %d, %d samples seen", restored_from, state.step, state.samples_seen
        )
        # Marks where this attempt took over in the MLflow run; the steps it redoes are logged
        # again (the later value of a step is the one that counts, see tracking.metric_history).
        writer.log(mlflow_metrics({"resumed_from_step": state.step}), step=state.step)
    # The driver's progress line (steps, ETA, loss EMA, val_loss) is fed by rank 0.
    progress = BoardReporter(context.get_experiment_name(), cfg.train.max_steps) if rank == 0 else None
    last_checkpoint_step = state.step if restored_from else None

    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    # The driver already dropped the examples consumed before `loop_config["data_skip"]`;
    # anything consumed since (the checkpoint is newer than the driver's view) is skipped here.
    skip_micro_batches = (state.samples_seen - loop_config["data_skip"]) // (
        cfg.train.batch_size * world_size
    )
    data = batches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, device)
    for _ in range(max(skip_micro_batches, 0)):
        next(data)

    validation_clips = load_validation_clips(cfg) if cfg.validate.manifest else []
    autocast = mixed_precision(cfg.train.mixed_precision, device)
    nan_steps = set(cfg.train.debug_nan_at_steps)
    bad_streak = 0  # skipped updates in a row
    unet.train()
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        step = state.step + 1
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.train.grad_accum):
            try:
                batch = next(data)
            except StopIteration:
                raise RuntimeError(
                    f"the data ran out at step {step}: too many clips failed to decode"
                ) from None
            # DDP all-reduces gradients only on the last micro-batch of an update.
            sync = micro == cfg.train.grad_accum - 1 or not hasattr(unet, "no_sync")
            with autocast, contextlib.nullcontext() if sync else unet.no_sync():
                loss = training_loss(unet, frozen, batch, cfg.objective, generator) / cfg.train.grad_accum
                if step in nan_steps:  # fault injection (train.debug_nan_at_steps)
                    loss = loss * float("nan")
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(raw_unet), cfg.optim.max_grad_norm)

        # Numerical guard: an update with a non-finite loss or gradient is skipped (no optimizer or
        # scheduler step; its gradients are dropped below). The step still counts and its examples
        # stay consumed, so the data plan and the step numbering do not shift.
        good = all_workers_finite(loss_sum, grad_norm)
        if good:
            optimizer.step()
            lr_scheduler.step()
            bad_streak = 0
        else:
            state.bad_steps += 1
            bad_streak += 1
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += global_batch
        elapsed = time.perf_counter() - started

        loss_value = mean_across_workers(loss_sum)
        metrics = {
            "loss": loss_value,
            "lr": lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "bad_steps": state.bad_steps,
            "samples_per_s": global_batch / elapsed,
            "frames_per_s": global_batch * cfg.data.num_frames / elapsed,
            "step": state.step,
        }
        if not good and rank == 0:
            warning = (
                f"step {state.step}: non-finite loss {loss_value} or gradient norm {metrics['grad_norm']}, "
                f"update skipped ({bad_streak} in a row, {state.bad_steps} in all)"
            )
            logger.warning(warning)
            progress.note("warning: " + warning)
        if bad_streak >= cfg.train.max_bad_steps:
            kept = f"step_{last_checkpoint_step:08d}" if last_checkpoint_step is not None else "none yet"
            message = (
                f"stopped at step {state.step}: {bad_streak} updates in a row (steps "
                f"{state.step - bad_streak + 1}-{state.step}) had a non-finite loss or gradient "
                f"(train.max_bad_steps={cfg.train.max_bad_steps}); the last good checkpoint is {kept}"
            )
            if writer:
                logger.error(message)
                writer.log(mlflow_metrics(metrics), step=state.step)
            ray.train.report(metrics)
            return {"stopped": message, "step": state.step, "bad_steps": state.bad_steps}

        is_last = state.step == cfg.train.max_steps
        if validation_clips and (is_last or state.step % cfg.validate.every == 0):
            metrics["val_loss"] = run_validation(
                cfg, raw_unet, frozen, validation_clips, loop_config, state.step
            )
            unet.train()
        if progress:
            progress.step(state.step, loss_value, metrics["samples_per_s"], metrics.get("val_loss"))
        if writer and (state.step % cfg.train.log_every == 0 or "val_loss" in metrics):
            writer.log(mlflow_metrics(metrics), step=state.step)
            logger.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.2f samples/s",
                state.step,
                cfg.train.max_steps,
                loss_value,
                metrics["lr"],
                metrics["grad_norm"],
                metrics["samples_per_s"],
            )

        # A checkpoint is written only after a good update (the last step excepted: the run ends
        # there), so the latest checkpoint never holds the state of a run on its way to a stop.
        if is_last or (good and state.step % cfg.train.checkpoint_every == 0):
            rngs = rng_snapshot(generator, rank, world_size)
            write = functools.partial(
                save_checkpoint,
                unet=raw_unet,
                lora_cfg=cfg.lora,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                state=state,
                rng_states=rngs,
                config=loop_config["config"],
            )
            name = f"step_{state.step:08d}"
            report_checkpoint(metrics, name, write if rank == 0 else None, cfg.train.checkpoint_upload)
            last_checkpoint_step = state.step
        elif state.step % cfg.train.report_every == 0 or "val_loss" in metrics:
            ray.train.report(metrics)

    if rank == 0:
        save_lora(raw_unet, cfg.lora, Path(cfg.output_dir) / "lora", cfg.model.pretrained)
    if cfg.train.save_worker_loras:
        save_worker_record(raw_unet, cfg.lora, cfg.output_dir, rank)
    return {"step": state.step, "bad_steps": state.bad_steps}


def run_validation(
    cfg: Config,
    unet: torch.nn.Module,
    frozen: FrozenModels,
    clips: list,
    loop_config: dict[str, Any],
    step: int,
) -> float:
    """`val_loss` over the held-out clips (all workers), videos and previews (rank 0, to MLflow).

    The RNGs are forked so validation draws nothing from the training streams, and the raw UNet
    (not the DDP wrapper) runs in eval mode, so no gradient collective is involved. Both run under
    training's mixed precision, the encoders in their own dtype, as in a training step."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = next(unet.parameters()).device
    devices = [device] if device.type == "cuda" else []
    unet.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        with mixed_precision(cfg.train.mixed_precision, device):
            val_loss = validation_loss_all(cfg, unet, frozen, clips, device, rank, world_size)
        if rank == 0 and cfg.validate.num_videos > 0:
            out_dir = Path(cfg.output_dir) / "validation" / f"step_{step:08d}"
            models = SamplingModels(
                unet,
                frozen,
                scheduler_config(cfg.model.pretrained, cfg.model.revision),
                mixed_precision_dtype(cfg.train.mixed_precision),
            )
            sample_validation_videos(cfg, models, clips, out_dir)
            tracking.log_artifacts(
                loop_config["tracking_uri"],
                loop_config["mlflow_run_id"],
                {f"validation/step_{step:08d}": out_dir},
            )
    if rank == 0:
        logger.info("step %d validation loss %.4f", step, val_loss)
    return val_loss
