"""Reward-gradient fine-tuning of the LoRA weights, on the same Ray Train machinery as `svdray train`.

Per step, on each worker: sample videos from conditioning images with the SVD sampler (graph kept
through the last K steps), decode them with the VAE, score them with the configured rewards and
ascend the weighted reward by updating LoRA weights only. Before the first update and every
`reward.check_every` steps the diagnostics run on the batch, and training refuses to start, or
stops, naming the cause, when a reward is zero, constant, fed the wrong pixel range or passes no
gradient to the LoRA.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import peft
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from svdray import tracking
from svdray.config import Config, RewardConfig, config_from_dict
from svdray.data.manifest import read_manifest
from svdray.data.video import FrameSpec, decode_clip, to_model_range
from svdray.model.lora import ADAPTER_WEIGHTS, lora_parameters, save_lora
from svdray.model.pipeline import load_pipeline
from svdray.reward.diagnostics import RewardCheckError, diagnose, format_table, raise_on_problems, report
from svdray.reward.rewards import RewardSet, build_reward
from svdray.reward.sampler import SamplingSpec, sample_frames
from svdray.sample import write_preview
from svdray.tracking import MetricWriter
from svdray.train.checkpoint import save_checkpoint
from svdray.train.failures import training_failure
from svdray.train.loop import build_models, mean_across_workers, restore_rng, restore_state, rng_snapshot
from svdray.train.trainer import (
    init_ray,
    make_trainer,
    raise_training_failure,
    resolve_paths,
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


def sampling_spec(cfg: Config) -> SamplingSpec:
    r = cfg.reward
    return SamplingSpec(
        num_frames=r.num_frames or cfg.data.num_frames,
        steps=r.sample_steps,
        grad_steps=r.grad_steps,
        fps=r.fps,
        motion_bucket_id=r.motion_bucket_id,
        noise_aug_strength=r.noise_aug_strength,
        min_guidance=r.min_guidance,
        max_guidance=r.max_guidance,
        decode_chunk=r.decode_chunk,
    )


def load_init_lora(unet: torch.nn.Module, lora_dir: str) -> None:
    """Load a supervised LoRA into the adapter `build_models` injected from the `lora` config."""
    weights = load_file(str(Path(lora_dir) / ADAPTER_WEIGHTS))
    result = peft.set_peft_model_state_dict(unet, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if getattr(result, "unexpected_keys", []) or missing:
        raise ValueError(
            f"reward.init_lora {lora_dir}: its adapter does not match the lora section of this config "
            "(use the rank, blocks and target_modules it was trained with)"
        )


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
    spec = sampling_spec(cfg)
    params = lora_parameters(raw_unet)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.optim.warmup_steps)

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
    unet.train()
    while state.step < cfg.train.max_steps:
        images = next(images_iter)
        frames = sample_frames(unet, frozen, loop_config["scheduler_config"], images, spec, generator)

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

        metrics = {
            "reward": mean_across_workers(total.detach().mean()),
            "grad_norm": grad_norm.item(),
            "lr": lr_scheduler.get_last_lr()[0],
            "step": state.step,
        }
        metrics.update(
            {f"reward/{name}": mean_across_workers(v.detach().mean()) for name, v in parts.items()}
        )
        if writer and state.step % cfg.train.log_every == 0:
            writer.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
            logger.info(
                "reward step %d/%d reward %.5f grad_norm %.3g",
                state.step,
                cfg.train.max_steps,
                metrics["reward"],
                metrics["grad_norm"],
            )
        if state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.max_steps:
            rngs = rng_snapshot(generator, rank, world_size)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(tmp, raw_unet, cfg.lora, optimizer, lr_scheduler, state, rngs)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{state.step:08d}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        save_lora(raw_unet, cfg.lora, Path(cfg.output_dir) / "lora")


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
    pipe = load_pipeline(cfg.model.pretrained, "float32", cfg.model.variant, cfg.model.revision)
    from svdray.train.step import FrozenModels

    frozen = FrozenModels(
        pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.vae.config.scaling_factor
    )
    unet = pipe.unet
    if lora_dir:
        from svdray.model.lora import load_lora

        load_lora(unet, lora_dir)
    rewards = build_reward_set(cfg.reward)
    pixels = to_model_range(torch.as_tensor(images))
    generator = torch.Generator().manual_seed(cfg.reward.seed + 10_000)
    frames = sample_frames(unet.eval(), frozen, pipe.scheduler.config, pixels, sampling_spec(cfg), generator)
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
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_or_resume_run(cfg)
    tracking.log_dict_artifact(uri, run_id, cfg.to_dict(), "config.yaml")

    images = conditioning_images(cfg, cfg.data.manifest)
    eval_images = conditioning_images(
        cfg, cfg.reward.eval_manifest or cfg.data.manifest, cfg.reward.eval_images
    )
    scheduler_config = dict(load_pipeline(cfg.model.pretrained).scheduler.config)
    trainer = make_trainer(
        cfg,
        reward_loop_per_worker,
        {
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "scheduler_config": scheduler_config,
        },
        ray.data.from_items([{"image": image} for image in images]),
    )
    try:
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
    pipe_scheduler = load_pipeline(cfg.model.pretrained).scheduler.config
    images = conditioning_images(cfg, cfg.data.manifest, max(cfg.train.batch_size, 2))
    pixels = to_model_range(torch.as_tensor(images)).to(device)
    generator = torch.Generator(device).manual_seed(cfg.reward.seed)
    frames = sample_frames(unet, frozen, pipe_scheduler, pixels, sampling_spec(cfg), generator)
    stats = diagnose(rewards, frames, pixels, lora_parameters(unet))
    if report_path:
        Path(report_path).write_text(json.dumps(report(stats), indent=1))
    return stats
