"""The Ray Data pipeline that feeds training: manifest rows -> decoded, cropped uint8 clips.

The driver plans every epoch up front (a seeded permutation per epoch), so the order of examples
and each example's random start and crop are fixed by the run seed alone. A resumed run skips
exactly the examples it has already trained on, and no worker's timing changes what it sees.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any

import numpy as np
import ray.data

from svdray.config import DataConfig
from svdray.data.video import ClipError, FrameSpec, decode_clip, to_model_range
from svdray.model.conditioning import motion_bucket_from_clip

logger = logging.getLogger(__name__)


def frame_spec(cfg: DataConfig) -> FrameSpec:
    return FrameSpec(cfg.num_frames, cfg.fps, cfg.height, cfg.width, cfg.start, cfg.crop)


def example_seed(run_seed: int, epoch: int, clip_id: str) -> int:
    return zlib.crc32(f"{run_seed}:{epoch}:{clip_id}".encode())


def plan_epochs(
    rows: list[dict[str, Any]], num_samples: int, seed: int, shuffle: bool, skip: int = 0
) -> list[dict[str, Any]]:
    """The training stream: whole epochs, each a seeded permutation of `rows`, as many as
    `num_samples` needs plus one spare epoch for clips that fail to decode; the first `skip`
    examples (already trained on) are left out."""
    epochs = math.ceil(num_samples / len(rows)) + 1
    items = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(rows)) if shuffle else range(len(rows))
        for i in order:
            row = rows[i]
            items.append(
                {
                    "video": row["video"],
                    "image": row.get("image") or "",
                    "clip_id": row["clip_id"],
                    "epoch": epoch,
                    "seed": example_seed(seed, epoch, row["clip_id"]),
                }
            )
    return items[skip:]


def decode_batch(
    batch: dict[str, np.ndarray],
    spec: FrameSpec,
    fps: float,
    motion_bucket_id: int | None,
    motion_bucket_scale: float,
    strict: bool,
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: decode each row; a clip that fails is skipped and logged
    (or, in strict mode, stops the run with its file and reason)."""
    out: dict[str, list] = {
        "video": [],
        "image": [],
        "fps": [],
        "motion_bucket_id": [],
        "clip_id": [],
        "epoch": [],
    }
    for i in range(len(batch["video"])):
        try:
            frames, image = decode_clip(
                str(batch["video"][i]), spec, int(batch["seed"][i]), str(batch["image"][i])
            )
        except ClipError as err:
            if strict:
                raise
            logger.warning("skipping clip %s: %s", batch["clip_id"][i], err)
            continue
        bucket = motion_bucket_id
        if bucket is None:
            bucket = motion_bucket_from_clip(to_model_range(frames), motion_bucket_scale)
        out["video"].append(frames.numpy())
        out["image"].append(image.numpy())
        out["fps"].append(np.float32(fps))
        out["motion_bucket_id"].append(np.float32(bucket))
        out["clip_id"].append(str(batch["clip_id"][i]))
        out["epoch"].append(int(batch["epoch"][i]))
    if not out["video"]:
        empty = {
            "video": np.zeros((0, spec.num_frames, 3, spec.height, spec.width), np.uint8),
            "image": np.zeros((0, 3, spec.height, spec.width), np.uint8),
        }
        return {
            **empty,
            "fps": np.zeros(0, np.float32),
            "motion_bucket_id": np.zeros(0, np.float32),
            "clip_id": np.array([], dtype=object),
            "epoch": np.zeros(0, np.int64),
        }
    return {
        "video": np.stack(out["video"]),
        "image": np.stack(out["image"]),
        "fps": np.array(out["fps"], np.float32),
        "motion_bucket_id": np.array(out["motion_bucket_id"], np.float32),
        "clip_id": np.array(out["clip_id"], dtype=object),
        "epoch": np.array(out["epoch"], np.int64),
    }


def build_training_dataset(
    rows: list[dict[str, Any]], cfg: DataConfig, num_samples: int, seed: int, skip: int = 0
) -> ray.data.Dataset:
    """Decoding runs as parallel Ray tasks, streamed: no clip is decoded long before it is used."""
    items = plan_epochs(rows, num_samples, seed, cfg.shuffle, skip)
    return ray.data.from_items(items).map_batches(
        decode_batch,
        batch_size=1,
        num_cpus=cfg.decode_cpus,
        fn_kwargs=dict(
            spec=frame_spec(cfg),
            fps=cfg.fps,
            motion_bucket_id=cfg.motion_bucket_id,
            motion_bucket_scale=cfg.motion_bucket_scale,
            strict=cfg.strict,
        ),
    )
