"""Reward-gradient fine-tuning of the LoRA weights, on the same Ray Train machinery as `svdray train`.

Per step, on each worker: sample videos from conditioning images with the family's sampler (graph
kept through the last K steps), decode them with the VAE, score them with the configured rewards and
ascend the weighted reward by updating LoRA weights only. Before the first update and every
`reward.check_every` steps the diagnostics run on the batch, and training refuses to start, or
stops, naming the cause, when a reward is zero, constant, fed the wrong pixel range or passes no
gradient to the LoRA.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
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
from svdray.config import Config, ConfigError, RewardConfig, config_from_dict
from svdray.data.manifest import read_manifest
from svdray.data.video import FrameSpec, decode_clip, to_model_range
from svdray.models import family_of
from svdray.models.base import TrainingModels
from svdray.models.lora import load_lora_weights, lora_parameters
from svdray.models.precision import mixed_precision
from svdray.progress import create_board
from svdray.reward.diagnostics import RewardCheckError, diagnose, format_table, raise_on_problems, report
from svdray.reward.rewards import RewardSet, build_reward
from svdray.sample import write_preview
from svdray.tracking import MetricWriter
from svdray.train.distributed import mean_across_workers, restore_rng
from svdray.train.failures import training_failure
from svdray.train.loop import StepLog, checkpoint_and_report, restore_state, this_worker
from svdray.train.optim import build_lr_scheduler, build_optimizer
from svdray.train.outputs import fetch_final_lora, save_final_lora
from svdray.train.parallel import parallelize
from svdray.train.trainer import (
    init_ray,
    make_trainer,
    raise_training_failure,
    resolve_paths,
    training_progress,
    write_run_config,
)

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
    family = family_of(cfg)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.reward.seed + rank)
    generator = torch.Generator(device).manual_seed(cfg.reward.seed * 1000 + rank)

    # Build: the family's models (from the supervised LoRA, if given), DDP, rewards, optimizer.
    models = family.build_models(cfg, device)
    if cfg.reward.init_lora:
        load_init_lora(models.denoiser, cfg.reward.init_lora)
    parallel = parallelize(models.denoiser, family.blocks(models.denoiser), "ddp", device, this_worker())
    sampling = family.sampling_models(cfg, TrainingModels(parallel.module, models.frozen))
    spec = family.sampling_spec(cfg, "reward")
    rewards = build_reward_set(cfg.reward).to(device)
    params = lora_parameters(models.denoiser)
    optimizer = build_optimizer(params, cfg.optim, cfg.speed, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    # Restore: the run's latest checkpoint, if any.
    state, rng_states, restored_from = restore_state(loop_config, parallel, optimizer, lr_scheduler)
    if rng_states is not None:
        restore_rng(rng_states, generator, rank)
    log = StepLog(cfg, loop_config, rank, state, restored_from, smoothed="reward")
    images_iter = image_batches(ray.train.get_dataset_shard("train"), cfg.train.batch_size, device)

    # Eval mode (no LoRA dropout): the rewarded videos are the ones inference will sample; the
    # gradient still flows through the last `reward.grad_steps` steps.
    parallel.module.eval()
    while state.step < cfg.train.max_steps:
        # Step: sample with a graph, check the rewards (first and every check_every), ascend them.
        started = time.perf_counter()
        images = next(images_iter)
        with mixed_precision(cfg.train.mixed_precision, device):
            frames = family.sample_frames(sampling, images, spec, generator, cfg.reward.grad_steps)
        if state.step % cfg.reward.check_every == 0:
            check_rewards(rewards, frames, images, params, state.step, rank, loop_config)
        total, parts = rewards(frames, images)
        (-total.mean()).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += cfg.train.batch_size * world_size

        # Log and checkpoint.
        metrics = {
            "reward": mean_across_workers(total.detach().mean()),
            "grad_norm": grad_norm.item(),
            "lr": lr_scheduler.get_last_lr()[0],
            "samples_per_s": cfg.train.batch_size * world_size / (time.perf_counter() - started),
            "step": state.step,
        }
        metrics |= {f"reward/{name}": mean_across_workers(v.detach().mean()) for name, v in parts.items()}
        log.log(metrics)
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.max_steps:
            checkpoint_and_report(metrics, parallel, optimizer, lr_scheduler, state, generator, loop_config)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        save_final_lora(family, models.denoiser, cfg)


def image_batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Conditioning images in [-1, 1], epoch after epoch over this worker's shard."""
    while True:
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            yield to_model_range(torch.as_tensor(batch["image"]).to(device))


def check_rewards(
    rewards: RewardSet,
    frames: torch.Tensor,
    images: torch.Tensor,
    params: list[torch.nn.Parameter],
    step: int,
    rank: int,
    loop_config: dict[str, Any],
) -> None:
    """The diagnostics on this worker's batch (rank 0 logs them and writes them to MLflow); a
    problem on any worker stops every worker, naming the cause."""
    stats = diagnose(rewards, frames, images, params)
    if rank == 0:
        logger.info("reward diagnostics at step %d\n%s", step, format_table(stats))
        tracking.log_dict_artifact(
            loop_config["tracking_uri"],
            loop_config["mlflow_run_id"],
            report(stats),
            f"reward_diagnostics_step{step:06d}.json",
        )
    raise_on_problems(
        stats, "refusing to start reward training" if step == 0 else f"rewards collapsed at step {step}"
    )


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
    family = family_of(cfg)
    models = family.load_sampling_models(cfg, lora_dir, "cpu")
    rewards = build_reward_set(cfg.reward)
    pixels = to_model_range(torch.as_tensor(images))
    generator = torch.Generator().manual_seed(cfg.reward.seed + 10_000)
    with mixed_precision(cfg.train.mixed_precision, pixels.device):
        frames = family.sample_frames(models, pixels, family.sampling_spec(cfg, "reward"), generator, 0)
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


def log_reward_sampling(cfg: Config, uri: str, run_id: str) -> str:
    """Log and tag (`svdray.sample_conditioning`) how the reward stage samples, as its family's
    `sample_frames` really does it (e.g. Wan: the empty prompt, no guidance)."""
    family = family_of(cfg)
    spec = family.sampling_spec(cfg, "reward")
    description = f"{family.describe_reward_sampling(spec)}, {spec.steps} steps"
    logger.info("reward samples: %s", description)
    tracking.set_tags(uri, run_id, {"svdray.sample_conditioning": description})
    return description


def run_reward_training(cfg: Config) -> RewardResult:
    if cfg.train.parallel != "ddp":
        # Its sampling keeps a graph through several denoiser calls and its diagnostics run extra
        # backward passes on one worker's batch: neither is written for a sharded model yet.
        raise ConfigError(f"train.parallel: reward-train runs with ddp only, not {cfg.train.parallel}")
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
    log_reward_sampling(cfg, uri, run_id)

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

    lora_dir = fetch_final_lora(cfg)
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
    family = family_of(cfg)
    models = family.build_models(cfg, device)
    if cfg.reward.init_lora:
        load_init_lora(models.denoiser, cfg.reward.init_lora)
    rewards = build_reward_set(cfg.reward).to(device)
    images = conditioning_images(cfg, cfg.data.manifest, max(cfg.train.batch_size, 2))
    pixels = to_model_range(torch.as_tensor(images)).to(device)
    generator = torch.Generator(device).manual_seed(cfg.reward.seed)
    models.denoiser.eval()
    with mixed_precision(cfg.train.mixed_precision, device):
        frames = family.sample_frames(
            family.sampling_models(cfg, models),
            pixels,
            family.sampling_spec(cfg, "reward"),
            generator,
            cfg.reward.grad_steps,
        )
    stats = diagnose(rewards, frames, pixels, lora_parameters(models.denoiser))
    if report_path:
        Path(report_path).write_text(json.dumps(report(stats), indent=1))
    return stats
