"""Reward-gradient fine-tuning of the LoRA weights, on the same Ray Train machinery as `svdray train`.

Per step, on each worker: sample videos from conditioning images with the SVD sampler (graph kept
through the last K steps), decode them with the VAE, score them with the configured rewards and
ascend the weighted reward by updating LoRA weights only. Before the first update and every
`reward.check_every` steps the diagnostics run on the batch, and training refuses to start, or
stops, naming the cause, when a reward is zero, constant, fed the wrong pixel range or passes no
gradient to the LoRA.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from svdray import tracking
from svdray.config import Config, RewardConfig, config_from_dict
from svdray.data.manifest import read_manifest
from svdray.data.video import FrameSpec, decode_clip, to_model_range
from svdray.model.lora import load_lora_weights, lora_parameters, save_lora
from svdray.model.pipeline import scheduler_config
from svdray.model.precision import mixed_precision
from svdray.model.sampler import load_sampling_models, sample_frames, sampling_spec
from svdray.progress import BoardReporter, create_board
from svdray.reward.diagnostics import RewardCheckError, diagnose, format_table, raise_on_problems, report
from svdray.reward.rewards import RewardSet, build_reward
from svdray.sample import write_preview
from svdray.tracking import MetricWriter, mlflow_metrics
from svdray.train.checkpoint import save_checkpoint
from svdray.train.failures import training_failure
from svdray.train.loop import build_models, mean_across_workers, restore_rng, restore_state, rng_snapshot
from svdray.train.optim import build_lr_scheduler, build_optimizer
from svdray.train.trainer import (
    init_ray,
    make_trainer,
    raise_training_failure,
    resolve_paths,
    training_progress,
    write_run_config,
)
from svdray.train.upload import report_checkpoint

logger = logging.getLogger("svdray.reward")


def build_reward_set(cfg: RewardConfig) -> RewardSet:
    return RewardSet(
        [
            (c.name or c.kind.rsplit(":", 1)[-1], build_reward(c.kind, c.options), c.weight)
            for c in cfg.components
        ],
        convert_inputs=cfg.convert_inputs,
    )


def load_init_lora(unet: torch.nn.Module, lora_dir: str) -> None:
    """Load a supervised LoRA into the adapter `build_models` injected from the `lora` config."""
    try:
        load_lora_weights(unet, lora_dir)
    except ValueError as err:
        raise ValueError(f"reward.init_lora: {err}") from None


def conditioning_images(cfg: Config, manifest: str, limit: int | None = None) -> np.ndarray:
    """(N, 3, H, W) uint8: each clip's conditioning image (its own, or its first frame)."""
    spec = FrameSpec(1, cfg.data.fps, cfg.data.height, cfg.data.width, "first", "center")
    images = []
    for row in read_manifest(manifest)[:limit]:
        _, image = decode_clip(row["video"], spec, seed=0, image_path=row.get("image"))
        images.append(image.numpy())
    return np.stack(images)


def reward_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = config_from_dict(loop_config["config"], check_files=False)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.reward.seed + rank)
    generator = torch.Generator(device).manual_seed(cfg.reward.seed * 1000 + rank)

    frozen, unet = build_models(cfg, device)
    if cfg.reward.init_lora:
        load_init_lora(unet, cfg.reward.init_lora)
    raw_unet = unet
    unet = ray.train.torch.prepare_model(unet, move_to_device=False)
    rewards = build_reward_set(cfg.reward).to(device)
    spec = sampling_spec(cfg, "reward")
    params = lora_parameters(raw_unet)
    optimizer = build_optimizer(params, cfg.optim, cfg.speed, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    autocast = mixed_precision(cfg.train.mixed_precision, device)

    state, rng_states, _ = restore_state(loop_config, raw_unet, optimizer, lr_scheduler)
    if rng_states is not None:
        restore_rng(rng_states, generator, rank)

    writer = MetricWriter(loop_config["tracking_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")

    def image_batches():
        while True:  # epochs over the conditioning images
            for batch in shard.iter_batches(
                batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True
            ):
                yield to_model_range(torch.as_tensor(batch["image"]).to(device))

    images_iter = image_batches()
    progress = (
        BoardReporter(context.get_experiment_name(), cfg.train.max_steps, "reward") if rank == 0 else None
    )
    # Eval mode (no LoRA dropout): the rewarded videos are the ones inference will sample; the
    # gradient still flows through the last `reward.grad_steps` steps.
    unet.eval()
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        images = next(images_iter)
        with autocast:
            frames = sample_frames(
                unet, frozen, loop_config["scheduler_config"], images, spec, generator, cfg.reward.grad_steps
            )

        if state.step % cfg.reward.check_every == 0:
            stats = diagnose(rewards, frames, images, params)
            if rank == 0:
                logger.info("reward diagnostics at step %d\n%s", state.step, format_table(stats))
                if writer:
                    tracking.log_dict_artifact(
                        loop_config["tracking_uri"],
                        loop_config["mlflow_run_id"],
                        report(stats),
                        f"reward_diagnostics_step{state.step:06d}.json",
                    )
            # Every worker checks its own batch; a problem on any of them stops all of them.
            when = (
                "refusing to start reward training"
                if state.step == 0
                else f"rewards collapsed at step {state.step}"
            )
            raise_on_problems(stats, when)

        total, parts = rewards(frames, images)
        (-total.mean()).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += cfg.train.batch_size * world_size
        step_time = time.perf_counter() - started

        metrics = {
            "reward": mean_across_workers(total.detach().mean()),
            "grad_norm": grad_norm.item(),
            "lr": lr_scheduler.get_last_lr()[0],
            "step": state.step,
        }
        metrics.update(
            {f"reward/{name}": mean_across_workers(v.detach().mean()) for name, v in parts.items()}
        )
        if progress:
            progress.step(state.step, metrics["reward"], cfg.train.batch_size * world_size / step_time)
        if writer and state.step % cfg.train.log_every == 0:
            writer.log(mlflow_metrics(metrics), step=state.step)
            logger.info(
                "reward step %d/%d reward %.5f grad_norm %.3g",
                state.step,
                cfg.train.max_steps,
                metrics["reward"],
                metrics["grad_norm"],
            )
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.max_steps:
            rngs = rng_snapshot(generator, rank, world_size)
            write = functools.partial(
                save_checkpoint,
                unet=raw_unet,
                lora_cfg=cfg.lora,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                state=state,
                rng_states=rngs,
            )
            name = f"step_{state.step:08d}"
            report_checkpoint(metrics, name, write if rank == 0 else None, cfg.train.checkpoint_upload)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        save_lora(raw_unet, cfg.lora, Path(cfg.output_dir) / "lora", cfg.model.pretrained)


@dataclass
class RewardResult:
    output_dir: Path
    lora_dir: Path
    mlflow_run_id: str
    tracking_uri: str
    eval_before: dict[str, float]
    eval_after: dict[str, float]


def unwrap_training_error(err: Exception) -> Exception:
    """The worker's own svdray exception (e.g. RewardCheckError) out of Ray Train's and svdray's
    wrappers (svdray.train.failures), if it has one."""
    failure = training_failure(err)
    return failure.original if failure is not None and failure.original is not None else err


@torch.no_grad()
def evaluate(cfg: Config, lora_dir: str | None, images: np.ndarray) -> tuple[dict[str, float], torch.Tensor]:
    """Mean rewards and frames for held-out images: the same seeds every time, no graph."""
    models = load_sampling_models(cfg.model, lora_dir, "cpu", cfg.train.mixed_precision)
    rewards = build_reward_set(cfg.reward)
    pixels = to_model_range(torch.as_tensor(images))
    generator = torch.Generator().manual_seed(cfg.reward.seed + 10_000)
    with models.autocast(pixels.device):
        frames = sample_frames(
            models.unet,
            models.frozen,
            models.scheduler_config,
            pixels,
            sampling_spec(cfg, "reward"),
            generator,
        )
    total, parts = rewards(frames, pixels)
    scores = {"reward": float(total.mean())} | {f"reward/{k}": float(v.mean()) for k, v in parts.items()}
    return scores, frames


def before_after_grid(before: torch.Tensor, after: torch.Tensor, path: Path, scale: int) -> Path:
    """One row per held-out image: its frames before (top) and after (bottom) reward training."""
    rows = []
    for b, a in zip(before, after, strict=True):
        rows += [b, a]
    frames = torch.cat(rows).clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return write_preview(frames, path, columns=before.shape[1], scale=scale)


def run_reward_training(cfg: Config) -> RewardResult:
    cfg = resolve_paths(cfg)
    if cfg.reward.init_lora:
        cfg.reward.init_lora = str(Path(cfg.reward.init_lora).resolve())
    output_dir = Path(cfg.output_dir)
    write_run_config(cfg)
    init_ray(cfg)
    board = create_board(cfg.train.name)
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_or_resume_run(cfg, sections=("model", "data", "lora", "optim", "train", "reward"))
    tracking.log_dict_artifact(uri, run_id, cfg.to_dict(), "config.yaml")
    # Conditioning images have no clip to compute a motion bucket from: say which one is used.
    spec = sampling_spec(cfg, "reward")
    conditioning = f"fps={spec.fps:g} motion_bucket_id={spec.bucket_for(None):g}"
    logger.info("reward samples: %s, %d steps", conditioning, spec.steps)
    tracking.set_tags(uri, run_id, {"svdray.sample_conditioning": conditioning})

    images = conditioning_images(cfg, cfg.data.manifest)
    eval_images = conditioning_images(
        cfg, cfg.reward.eval_manifest or cfg.data.manifest, cfg.reward.eval_images
    )
    trainer = make_trainer(
        cfg,
        reward_loop_per_worker,
        {
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "scheduler_config": scheduler_config(cfg.model.pretrained, cfg.model.revision),
        },
        ray.data.from_items([{"image": image} for image in images]),
    )
    try:
        with training_progress(cfg, board, "reward-train"), tracking.SystemMetrics(uri, run_id):
            trainer.fit()
    except Exception as err:
        cause = unwrap_training_error(err)
        if isinstance(cause, RewardCheckError):
            tracking.end_run(uri, run_id, status="FAILED")
            raise RewardCheckError(str(cause)) from err
        raise_training_failure(err, uri, run_id)
        tracking.end_run(uri, run_id, status="FAILED")
        raise

    lora_dir = output_dir / "lora"
    before, before_frames = evaluate(cfg, cfg.reward.init_lora, eval_images)
    after, after_frames = evaluate(cfg, str(lora_dir), eval_images)
    writer = MetricWriter(uri, run_id)
    writer.log(
        {f"eval_before/{k}": v for k, v in before.items()} | {f"eval_after/{k}": v for k, v in after.items()},
        step=cfg.train.max_steps,
    )
    grid = before_after_grid(
        before_frames, after_frames, output_dir / "before_after.png", scale=max(1, 128 // cfg.data.height)
    )
    (output_dir / "eval_rewards.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    tracking.log_artifacts(uri, run_id, {"lora": lora_dir, "": grid})
    tracking.log_artifacts(uri, run_id, {"": output_dir / "eval_rewards.json"})
    tracking.end_run(uri, run_id)
    return RewardResult(output_dir, lora_dir, run_id, uri, before, after)


def run_reward_check(cfg: Config, report_path: str | Path | None = None) -> list:
    """`svdray reward-check`: the pre-training diagnostics, in this process, on one batch."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.use_gpu else "cpu")
    frozen, unet = build_models(cfg, device)
    if cfg.reward.init_lora:
        load_init_lora(unet, cfg.reward.init_lora)
    rewards = build_reward_set(cfg.reward).to(device)
    images = conditioning_images(cfg, cfg.data.manifest, max(cfg.train.batch_size, 2))
    pixels = to_model_range(torch.as_tensor(images)).to(device)
    generator = torch.Generator(device).manual_seed(cfg.reward.seed)
    unet.eval()
    with mixed_precision(cfg.train.mixed_precision, device):
        frames = sample_frames(
            unet,
            frozen,
            scheduler_config(cfg.model.pretrained, cfg.model.revision),
            pixels,
            sampling_spec(cfg, "reward"),
            generator,
            cfg.reward.grad_steps,
        )
    stats = diagnose(rewards, frames, pixels, lora_parameters(unet))
    if report_path:
        Path(report_path).write_text(json.dumps(report(stats), indent=1))
    return stats
