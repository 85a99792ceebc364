"""Validation during training: a loss comparable across runs, and videos to look at.

Every `validate.every` steps (and at the last step) the loop
  (a) computes `val_loss`: the family's loss of the held-out clips at a fixed noise-level grid with
      fixed noise (`ModelFamily.validation_loss`), so it moves only when the weights do and can be
      compared between steps, runs and Tune trials;
  (b) on rank 0, samples videos from the first frames of the first `validate.num_videos` held-out
      clips with the family's `sample_video` - the code behind `svdray sample` - on the denoiser
      being trained (LoRA applied, eval mode) with the run's sampling spec, and writes per
      clip an mp4 and, per step, one preview (GIF and PNG) of conditioning frame | sample | ground
      truth side by side.

Held-out clips are decoded once, from their first frame, center-cropped: the same frames at every
validation. Nothing here draws from the training RNGs (the caller forks them), so turning
validation on or off does not change what training computes.

Where it runs is `validate.mode`: "inline" in the loop between two steps (all workers share the
clips); "checkpoint" outside the training step, as Ray Train's checkpoint validation
(`checkpoint_validation`): a Ray task builds the family's models once more, loads the
checkpoint's LoRA and does (a) and (b) alone while the workers train on. Both compute the same
`val/loss` at a step: the same clips, noise grid, seeds and precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from PIL import Image
from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

from svdray import tracking
from svdray.config import Config, config_from_dict
from svdray.data.manifest import read_manifest
from svdray.data.video import FrameSpec, decode_clip, motion_score
from svdray.models import family_of
from svdray.models.base import ModelFamily, TrainingModels
from svdray.models.lora import load_lora_weights
from svdray.models.precision import mixed_precision
from svdray.sample import write_mp4
from svdray.train.checkpoint import read_train_state
from svdray.train.parallel import Parallel

logger = logging.getLogger("svdray.train")


@dataclass
class ValidationClip:
    index: int  # position in the validation manifest: fixes its noise seed
    video: torch.Tensor  # (T, 3, H, W) uint8, the ground truth
    image: torch.Tensor  # (3, H, W) uint8, the conditioning frame
    motion: float  # `motion_score` of the clip, as the data layer computes it for training clips
    motion_bucket_id: float  # the manifest's per-clip value, -1 when absent
    prompt: str


def load_validation_clips(cfg: Config) -> list[ValidationClip]:
    rows = read_manifest(cfg.validate.manifest)[: cfg.validate.max_clips]
    spec = FrameSpec(cfg.data.num_frames, cfg.data.fps, cfg.data.height, cfg.data.width, "first", "center")
    clips = []
    for index, row in enumerate(rows):
        frames, image = decode_clip(row["video"], spec, seed=0, image_path=row.get("image"))
        bucket = float(row["motion_bucket_id"]) if row.get("motion_bucket_id") is not None else -1.0
        clips.append(
            ValidationClip(index, frames, image, motion_score(frames), bucket, row.get("prompt") or "")
        )
    return clips


def clip_batch(clip: ValidationClip, fps: float, device: torch.device) -> dict[str, Any]:
    """One clip as a training batch of size 1, with the columns the data layer delivers."""
    return {
        "video": clip.video[None].to(device),
        "image": clip.image[None].to(device),
        "fps": torch.tensor([fps], dtype=torch.float32, device=device),
        "motion": torch.tensor([clip.motion], dtype=torch.float64, device=device),
        "motion_bucket_id": torch.tensor([clip.motion_bucket_id], dtype=torch.float32, device=device),
        "prompt": [clip.prompt],
    }


def validation_loss_all(
    cfg: Config,
    family: ModelFamily,
    models: TrainingModels,
    clips: list[ValidationClip],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    collective: bool = False,
) -> float:
    """Mean validation loss over all clips; each worker takes every world_size-th clip.
    `collective`: the denoiser's forward is a collective (a sharded model gathers each block from
    every worker), so every worker runs the same number of them: one that has no clip left in a
    round runs the round's first clip again and counts nothing."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    rounds = -(-len(clips) // world_size) if collective else len(clips[rank::world_size])
    for round_ in range(rounds):
        index = round_ * world_size + rank
        counted = index < len(clips)
        clip = clips[index if counted else round_ * world_size]
        batch = clip_batch(clip, cfg.data.fps, device)
        loss = family.validation_loss(
            models.denoiser, models.frozen, batch, cfg, seed=cfg.validate.seed + clip.index
        )
        if counted:
            totals[0] += loss
            totals[1] += 1
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1]).item()


class Validation:
    """The run's held-out clips, decoded once, and what a validation does with them."""

    def __init__(self, cfg: Config, family: ModelFamily, loop_config: dict[str, Any]):
        self.cfg, self.family, self.loop_config = cfg, family, loop_config
        self.clips = load_validation_clips(cfg)

    def run(self, models: TrainingModels, step: int, parallel: Parallel | None = None) -> float:
        """`val_loss` over the held-out clips (all workers of `parallel`; one without it),
        videos and previews (rank 0, to MLflow).

        The RNGs are forked so validation draws nothing from the training streams, and the raw
        denoiser (not the DDP wrapper) runs in eval mode, so no gradient collective is involved.
        Both run under training's mixed precision, the encoders in their own dtype, as in a step.
        The clips are dealt out by data-parallel rank. When a forward of the denoiser involves
        other workers (it is sharded, or split over a context-parallel group), every worker runs
        every round and samples the videos too (rank 0 writes them): a group's workers validate
        and sample the same clip, split the same way as in training, with the same seeds."""
        cfg = self.cfg
        rank = parallel.workers.rank if parallel else 0
        clip_rank, clip_ranks = (parallel.data_rank, parallel.data_parallel_size) if parallel else (0, 1)
        collective = parallel.collective_forward if parallel else False
        device = next(models.denoiser.parameters()).device
        models.denoiser.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            with mixed_precision(cfg.train.mixed_precision, device):
                val_loss = validation_loss_all(
                    cfg, self.family, models, self.clips, device, clip_rank, clip_ranks, collective
                )
            if (rank == 0 or collective) and cfg.validate.num_videos > 0:
                out_dir = Path(cfg.output_dir) / "validation" / f"step_{step:08d}"
                sampling = self.family.sampling_models(cfg, models)
                sample_validation_videos(cfg, self.family, sampling, self.clips, out_dir, write=rank == 0)
            if rank == 0 and cfg.validate.num_videos > 0:
                tracking.log_artifacts(
                    self.loop_config["tracking_uri"],
                    self.loop_config["mlflow_run_id"],
                    {f"validation/step_{step:08d}": out_dir},
                )
        if rank == 0:
            logger.info("step %d validation loss %.4f", step, val_loss)
        return val_loss


def validate_checkpoint(
    checkpoint: ray.train.Checkpoint, *, config: dict[str, Any], tracking_uri: str, mlflow_run_id: str
) -> dict[str, float]:
    """Ray Train's validation function (`validate.mode: checkpoint`): the run's validation of one
    checkpoint, in a Ray task of its own. `val/loss` goes to the MLflow run at the checkpoint's
    step (with the videos and previews, as inline), and back to Ray as the checkpoint's metric."""
    cfg = config_from_dict(config, check_files=False)
    family = family_of(cfg)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    with checkpoint.as_directory() as folder:
        step = read_train_state(folder).step
        models = family.build_models(cfg, device)
        load_lora_weights(models.denoiser, Path(folder) / "lora")
    loop_config = {"tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id}
    val_loss = Validation(cfg, family, loop_config).run(models, step)
    tracking.MetricWriter(tracking_uri, mlflow_run_id).log(
        tracking.mlflow_metrics({"val_loss": val_loss}), step=step
    )
    return {"val_loss": val_loss}


def checkpoint_validation(cfg: Config, tracking_uri: str, mlflow_run_id: str) -> ValidationConfig | None:
    """The trainer's `validation_config` for `validate.mode: checkpoint` (None otherwise): each
    validation task reserves what a training worker does (its CPUs, a GPU on GPU runs), so on a
    full cluster it waits for one; Ray Train runs one at a time and waits for the last before the
    run ends."""
    if not cfg.validate.manifest or cfg.validate.mode != "checkpoint":
        return None
    kwargs = {"config": cfg.to_dict(), "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id}
    return ValidationConfig(
        fn=validate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs),
        ray_remote_kwargs={"num_cpus": cfg.train.cpus_per_worker, "num_gpus": 1 if cfg.train.use_gpu else 0},
    )


def to_hwc(pixels: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) uint8 tensor -> (..., H, W, 3) numpy."""
    return pixels.movedim(-3, -1).cpu().numpy()


def write_previews(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    out_dir: Path,
    fps: float,
    scale: int = 1,
    min_side: int = 256,
) -> list[Path]:
    """rows of (conditioning frame (H, W, 3), sample (T, H, W, 3), ground truth (T, H, W, 3) or None).

    preview.gif animates one line per clip: conditioning frame | sample | ground truth.
    preview.png shows every frame: per clip, the sample's frames on one line and the ground
    truth's below, each line starting with the conditioning frame.
    Both are upscaled (nearest neighbour, at least `scale` times) until a frame's shorter side is
    `min_side` pixels: a 32-pixel clip is unreadable in the MLflow UI's artifact viewer.
    """
    frame_counts = [
        len(sample) if truth is None else min(len(sample), len(truth)) for _, sample, truth in rows
    ]
    num_frames = min(frame_counts)
    gif_frames = []
    for t in range(num_frames):
        lines = [
            np.concatenate([cond, sample[t], *([] if truth is None else [truth[t]])], axis=1)
            for cond, sample, truth in rows
        ]
        gif_frames.append(np.concatenate(lines, axis=0))
    strips = []
    for cond, sample, truth in rows:
        strips.append(np.concatenate([cond, *sample[:num_frames]], axis=1))
        if truth is not None:
            strips.append(np.concatenate([cond, *truth[:num_frames]], axis=1))
    png = np.concatenate(strips, axis=0)
    side = min(rows[0][0].shape[:2])
    scale = max(scale, -(-min_side // side))

    def upscale(array: np.ndarray) -> Image.Image:
        image = Image.fromarray(array)
        return image.resize((image.width * scale, image.height * scale), Image.NEAREST)

    gif_path, png_path = out_dir / "preview.gif", out_dir / "preview.png"
    images = [upscale(frame) for frame in gif_frames]
    images[0].save(gif_path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    upscale(png).save(png_path)
    return [gif_path, png_path]


def sample_validation_videos(
    cfg: Config,
    family: ModelFamily,
    models: Any,
    clips: list[ValidationClip],
    out_dir: Path,
    write: bool = True,
) -> Path:
    """mp4s and previews for the first `validate.num_videos` clips, written into `out_dir`: each
    sampled from the clip's conditioning frame with the run's sampling spec (training's fps and
    motion-bucket rule), seeded by the clip's position so every validation is comparable.
    `write=False` samples only (the other workers of a sharded model, whose forward rank 0's
    sampling needs)."""
    spec = family.sampling_spec(cfg, "validate")
    rows = []
    for clip in clips[: cfg.validate.num_videos]:
        frames = family.sample_video(
            models, clip.image, spec, clip=clip.video, prompt=clip.prompt, seed=spec.seed + clip.index
        )
        rows.append((clip, frames))
    if not write:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for clip, frames in rows:
        write_mp4(frames, out_dir / f"clip{clip.index:03d}.mp4", spec.fps)
    if rows:
        previews = [(to_hwc(clip.image), frames, to_hwc(clip.video)) for clip, frames in rows]
        write_previews(previews, out_dir, spec.fps, scale=max(1, 128 // cfg.data.height))
    return out_dir
