"""The training loop each Ray Train worker runs, top to bottom, for any model family.

build the family's models (frozen encoders, LoRA on the denoiser) -> spread the denoiser over the
workers (`train.parallel`: DDP, FSDP2 or HSDP) -> AdamW + schedule -> restore the run's latest
checkpoint (or the chosen one) -> for each step: accumulate gradients over micro-batches, clip,
update unless the loss or gradient is not finite, validate every `validate.every` steps, log,
report to Ray with a checkpoint every `checkpoint_every` steps -> save the final LoRA
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from svdray import storage
from svdray.config import Config, config_from_dict
from svdray.data.dataset import same_shape_batches
from svdray.data.ledger import find_ledger
from svdray.models import family_of
from svdray.models.base import ModelFamily
from svdray.models.lora import lora_parameters
from svdray.progress import BoardReporter
from svdray.tracking import MetricWriter, mlflow_metrics
from svdray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from svdray.train.distributed import mean_across_workers, restore_rng, rng_snapshot
from svdray.train.optim import build_lr_scheduler, build_optimizer
from svdray.train.outputs import run_output, save_final_lora
from svdray.train.parallel import ContextParallel, Parallel, Workers, data_rank, parallelize
from svdray.train.step import update
from svdray.train.upload import report_checkpoint
from svdray.train.validate import Validation
from svdray.train.workers import save_worker_record

logger = logging.getLogger("svdray.train")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Returns (on rank 0, as `Result.return_value`) {"step", "bad_steps"} and, when the numerical
    guard stopped the run, {"stopped": message}."""
    cfg = config_from_dict(loop_config["config"], check_files=False)
    family = family_of(cfg)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The global batch stays whatever the worker count (an elastic run restarts at another): the
    # accumulation is what this attempt's count needs for it.
    cfg.train = cfg.train.at_world_size(world_size)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    # All training randomness (noise levels, noise, augmentation, dropout masks) comes from this
    # generator, so a checkpoint of its state makes resumed steps draw the same numbers. Seeded by
    # the data-parallel rank: the workers of a context-parallel group draw the same numbers for
    # the clip they share.
    split = ContextParallel.of(cfg.train)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1000 + data_rank(rank, split))

    # Build: the family's models, the denoiser spread over the workers (train.parallel), then the
    # optimizer over its LoRA weights as this worker holds them (whole, or its shards).
    models = family.build_models(cfg, device)
    inline = bool(cfg.validate.manifest) and cfg.validate.mode == "inline"
    if cfg.data.cache and not inline:
        family.release_encoders(models)  # the cache holds what they compute
    parallel = parallelize(
        models.denoiser, family.blocks(models.denoiser), cfg.train.parallel, device, this_worker(), split
    )
    optimizer = build_optimizer(lora_parameters(models.denoiser), cfg.optim, cfg.speed, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    # Restore: the run's latest checkpoint (after a restart), else train.resume_from, else fresh.
    state, rng_states, restored_from = restore_state(loop_config, parallel, optimizer, lr_scheduler)
    if rng_states is not None:
        restore_rng(rng_states, generator, rank)
    state.world_size = world_size  # what this attempt's checkpoints record
    log = StepLog(cfg, loop_config, rank, state, restored_from)
    # The first worker of each context-parallel group reads the group's share of the stream.
    shard = ray.train.get_dataset_shard("train") if parallel.reads_data else None
    data = batches(shard, cfg, family, device, loop_config["data_skip"], state, parallel)
    validation = Validation(cfg, family, loop_config) if inline else None
    global_batch = cfg.train.global_batch()
    last_checkpoint = state.step if restored_from else None
    bad_streak = 0  # skipped updates in a row

    parallel.train()
    while state.step < cfg.train.max_steps:
        # Step: one update from grad_accum micro-batches; skipped unless finite on every worker.
        started = time.perf_counter()
        loss, grad_norm, good = update(
            parallel, models, family, data, cfg, generator, state.step + 1, optimizer
        )
        if good:
            lr_scheduler.step()
        bad_streak = 0 if good else bad_streak + 1
        state.bad_steps += not good
        state.step += 1
        state.samples_seen += global_batch
        elapsed = time.perf_counter() - started
        metrics = {
            "loss": mean_across_workers(loss),
            "lr": lr_scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "bad_steps": state.bad_steps,
            "num_workers": world_size,
            "samples_per_s": global_batch / elapsed,
            "frames_per_s": global_batch * cfg.data.num_frames / elapsed,
            "step": state.step,
        }
        if not good:
            log.skipped_update(metrics, bad_streak)
        if bad_streak >= cfg.train.max_bad_steps:
            message = log.stop_message(state, bad_streak, last_checkpoint)
            log.log(metrics, force=True)
            ray.train.report(metrics)
            return {"stopped": message, "step": state.step, "bad_steps": state.bad_steps}

        # Validate, log, report: a checkpoint only after a good update (or at the last step), so
        # the latest checkpoint never holds a run on its way to a numerical stop.
        is_last = state.step == cfg.train.max_steps
        validates = bool(cfg.validate.manifest) and (is_last or state.step % cfg.validate.every == 0)
        if validates and inline:
            metrics["val_loss"] = validation.run(models, state.step, parallel)
            parallel.train()
        log.log(metrics, force=is_last)  # the last step's loss, whatever train.log_every
        if is_last or (good and state.step % cfg.train.checkpoint_every == 0):
            checkpoint_and_report(
                metrics,
                parallel,
                optimizer,
                lr_scheduler,
                state,
                generator,
                loop_config,
                validate=validates and not inline,  # validate.mode: checkpoint
            )
            last_checkpoint = state.step
        elif state.step % cfg.train.report_every == 0 or "val_loss" in metrics:
            ray.train.report(metrics)

    # Finish: the final LoRA, gathered from every worker (and, as a check that the workers
    # agree, each worker's own copy if asked).
    lora = parallel.lora_state_dict(everywhere=cfg.train.save_worker_loras)
    if rank == 0:
        save_final_lora(family, models.denoiser, cfg, lora)  # output_dir/lora, or the run's bucket folder
    if cfg.train.save_worker_loras:
        with run_output(cfg, f"workers/rank{rank}") as folder:
            save_worker_record(models.denoiser, folder, rank, lora, parallel.mesh_ranks())
    return {"step": state.step, "bad_steps": state.bad_steps}


def this_worker() -> Workers:
    context = ray.train.get_context()
    node = ray.get_runtime_context().get_node_id()
    return Workers(context.get_world_rank(), context.get_world_size(), node)


def batches(
    shard: Any,
    cfg: Config,
    family: ModelFamily,
    device: torch.device,
    data_skip: int,
    state: TrainState,
    parallel: Parallel,
) -> Iterator[dict[str, Any]]:
    """Model inputs from this worker's Ray Data shard: the family's columns as tensors on the
    device (uint8 pixels as they are), prompts as a list of strings.

    Examples arrive one per block and are batched by shape (one aspect-ratio bucket per batch).
    The driver already dropped the examples consumed before `data_skip`; anything consumed since (the
    checkpoint is newer than the driver's view) is skipped here: Ray Train deals the stream out
    round-robin anew at every (re)start, one shard per data-parallel rank, so whatever this
    attempt's worker count, skipping (samples_seen - data_skip) / (batch_size x data-parallel
    ranks) batches on each skips exactly those examples. Each batch trained on is recorded in the
    run's data ledger with its step, the step this attempt started from and its data-parallel
    rank, so what was fed can be checked. Under context parallelism the group's first worker
    reads (`shard`; None on the others) and records, and every worker of the group gets its
    batches (`Parallel.shared_batches`).
    """
    read = _read_batches(shard, cfg, family, data_skip, state, parallel) if parallel.reads_data else None
    for batch in parallel.shared_batches(read):
        inputs: dict[str, Any] = {
            k: torch.from_numpy(batch[k]).to(device, non_blocking=True)
            for k in family.batch_columns
            if k in batch
        }
        inputs["prompt"] = [str(p) for p in batch.get("prompt", [""] * len(batch["clip_id"]))]
        yield inputs


def _read_batches(
    shard: Any, cfg: Config, family: ModelFamily, data_skip: int, state: TrainState, parallel: Parallel
) -> Iterator[dict[str, Any]]:
    context = ray.train.get_context()
    ledger = find_ledger(context.get_experiment_name())
    per_micro_step = cfg.train.batch_size * parallel.data_parallel_size
    skip = (state.samples_seen - data_skip) // per_micro_step
    started_at = state.step
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
    for index, batch in enumerate(same_shape_batches(blocks, cfg.train.batch_size, family.batch_columns)):
        if index < skip:
            continue
        if ledger is not None:
            # Waited for: a worker that exits right after its last step must not drop it.
            step = started_at + (index - skip) // cfg.train.grad_accum + 1
            fed = [str(c) for c in batch["clip_id"]], [int(e) for e in batch["epoch"]]
            ray.get(ledger.record_fed.remote(parallel.data_rank, *fed, step, started_at))
        yield batch


def restore_state(
    loop_config: dict[str, Any],
    parallel: Parallel,
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
            state, rng_states = load_checkpoint(ckpt_dir, parallel, optimizer, lr_scheduler)
        return state, rng_states, checkpoint.path
    if loop_config.get("resume_from"):
        with storage.local_copy(loop_config["resume_from"]) as local:  # a folder, or one in a bucket
            state, rng_states = load_checkpoint(local, parallel, optimizer, lr_scheduler)
        return state, rng_states, loop_config["resume_from"]
    return TrainState(), None, None


def checkpoint_and_report(
    metrics: dict[str, float],
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    generator: torch.Generator,
    loop_config: dict[str, Any],
    validate: bool = False,
) -> None:
    """Report `metrics` to Ray with a checkpoint of the run: rank 0 writes it, with every rank's
    RNG states gathered from all workers and the LoRA gathered from a sharded model; under
    FSDP2 every worker also writes its shards of the LoRA and the optimizer state (and reports
    them, Ray Train puts every worker's files into the one checkpoint). Uploaded as
    `train.checkpoint_upload` says; `validate` has Ray Train validate it outside the training
    step (`validate.mode: checkpoint`)."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    rngs = rng_snapshot(generator, rank, context.get_world_size())
    write = functools.partial(
        save_checkpoint,
        denoiser=parallel.denoiser,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        state=state,
        rng_states=rngs,
        config=loop_config["config"],
        lora_state=parallel.lora_state_dict(),
        sharded=parallel.sharded_state(optimizer) if parallel.sharded else None,
        rank=rank,
    )
    upload = loop_config["config"]["train"]["checkpoint_upload"]
    writes = rank == 0 or parallel.sharded
    report_checkpoint(metrics, f"step_{state.step:08d}", write if writes else None, upload, validate)


@dataclass
class StepLog:
    """Rank 0's account of the run: MLflow step metrics, the driver's progress line (fed through
    the run's progress board), and the console. Other ranks log nothing."""

    cfg: Config
    loop_config: dict[str, Any]
    rank: int
    state: TrainState
    restored_from: str | None
    smoothed: str = "loss"  # the metric the progress line averages: "loss", or "reward"

    def __post_init__(self) -> None:
        self.writer = self.progress = None
        if self.rank != 0:
            return
        self.writer = MetricWriter(self.loop_config["tracking_uri"], self.loop_config["mlflow_run_id"])
        run = ray.train.get_context().get_experiment_name()
        self.progress = BoardReporter(run, self.cfg.train.max_steps, self.smoothed)
        if self.restored_from:
            logger.info(
                "resumed from %s: step %d, %d samples seen",
                self.restored_from,
                self.state.step,
                self.state.samples_seen,
            )
            # Marks where this attempt took over in the MLflow run; the steps it redoes are logged
            # again (the later value of a step is the one that counts, see tracking.metric_history).
            self.writer.log(mlflow_metrics({"resumed_from_step": self.state.step}), step=self.state.step)

    def log(self, metrics: dict[str, float], force: bool = False) -> None:
        if self.rank != 0:
            return
        step = int(metrics["step"])
        self.progress.step(step, metrics[self.smoothed], metrics["samples_per_s"], metrics.get("val_loss"))
        if force or step % self.cfg.train.log_every == 0 or "val_loss" in metrics:
            self.writer.log(mlflow_metrics(metrics), step=step)
            logger.info(
                "step %d/%d %s %.5g lr %.2e grad_norm %.3g %.2f samples/s",
                step,
                self.cfg.train.max_steps,
                self.smoothed,
                metrics[self.smoothed],
                metrics["lr"],
                metrics["grad_norm"],
                metrics["samples_per_s"],
            )

    def skipped_update(self, metrics: dict[str, float], streak: int) -> None:
        if self.rank != 0:
            return
        warning = (
            f"step {metrics['step']}: non-finite loss {metrics['loss']} or gradient norm "
            f"{metrics['grad_norm']}, update skipped ({streak} in a row, {metrics['bad_steps']} in all)"
        )
        logger.warning(warning)
        self.progress.note("warning: " + warning)

    def stop_message(self, state: TrainState, streak: int, last_checkpoint: int | None) -> str:
        kept = f"step_{last_checkpoint:08d}" if last_checkpoint is not None else "none yet"
        message = (
            f"stopped at step {state.step}: {streak} updates in a row (steps "
            f"{state.step - streak + 1}-{state.step}) had a non-finite loss or gradient "
            f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the last good checkpoint is {kept}"
        )
        if self.rank == 0:
            logger.error(message)
        return message
