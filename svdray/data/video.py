"""Decoding one training example: frames sampled by timestamp, resized, cropped.

decord seeks to just the frames it needs (`get_batch` on sparse indices), so a long source clip
costs about as much as a short one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ClipError(ValueError):
    """A clip that cannot be used, with the file and the reason."""


@dataclass(frozen=True)
class FrameSpec:
    num_frames: int
    fps: float
    height: int
    width: int
    start: str = "first"  # "first" | "random"
    crop: str = "center"  # "center" | "random"


def frame_indices(timestamps: np.ndarray, spec: FrameSpec, rng: np.random.Generator, path: str) -> np.ndarray:
    """Indices of the source frames showing times start + i / spec.fps, i < num_frames.

    Working from each frame's own timestamp (not index * fps) keeps motion speed the same for
    24, 25 and 29.97 fps sources and handles variable frame rate.
    """
    span = (spec.num_frames - 1) / spec.fps
    last_start = float(timestamps[-1]) - span
    if last_start < -1e-6:
        raise ClipError(
            f"{path}: too short: {timestamps[-1]:.2f}s of video, {spec.num_frames} frames at "
            f"{spec.fps:g} fps need {span:.2f}s"
        )
    start = 0.0 if spec.start == "first" else float(rng.uniform(0.0, max(last_start, 0.0)))
    wanted = start + np.arange(spec.num_frames) / spec.fps
    idx = np.searchsorted(timestamps, wanted + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(timestamps) - 1)


def resize_and_crop(frames: torch.Tensor, spec: FrameSpec, crop_at: tuple[float, float]) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, spec.height, spec.width) uint8: cover-resize, then crop.

    `crop_at` is the crop's relative position (0.5, 0.5 = centre), shared by a clip and its
    conditioning image so both frame the same content.
    """
    _, _, h, w = frames.shape
    scale = max(spec.height / h, spec.width / w)
    new_h, new_w = max(spec.height, math.ceil(h * scale)), max(spec.width, math.ceil(w * scale))
    resized = F.interpolate(
        frames.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )
    top = round((new_h - spec.height) * crop_at[0])
    left = round((new_w - spec.width) * crop_at[1])
    cropped = resized[:, :, top : top + spec.height, left : left + spec.width]
    return cropped.round().clamp(0, 255).to(torch.uint8)


def load_image(path: str) -> torch.Tensor:
    """An RGB image as (3, H, W) uint8, whatever its mode (grayscale, RGBA, 16-bit, palette)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((array / max(array.max(), 1) * 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            rgb = np.asarray(img.convert("RGB"))
    except FileNotFoundError as err:
        raise ClipError(f"{path}: image not found") from err
    except Exception as err:  # PIL raises many types for broken files
        raise ClipError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def open_video(path: str):
    """A decord VideoReader, or ClipError naming the file and why it cannot be read."""
    import decord  # imported here so that processes that never decode need not load it

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except FileNotFoundError as err:
        raise ClipError(f"{path}: video not found") from err
    except Exception as err:
        raise ClipError(
            f"{path}: cannot open as video ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    if len(reader) == 0:
        raise ClipError(f"{path}: video has no frames")
    return reader


def decode_clip(
    video_path: str, spec: FrameSpec, seed: int, image_path: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one example: (frames (T, 3, H, W) uint8, conditioning image (3, H, W) uint8).

    `seed` fixes the random start and crop, so a clip's frames depend only on (run seed, epoch,
    clip), not on which worker decodes it or when.
    """
    rng = np.random.default_rng(seed)
    reader = open_video(video_path)
    try:
        timestamps = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
        indices = frame_indices(timestamps, spec, rng, video_path)
        array = reader.get_batch(indices.tolist()).asnumpy()
    except ClipError:
        raise
    except Exception as err:
        raise ClipError(
            f"{video_path}: decoding failed ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    crop_at = (0.5, 0.5) if spec.crop == "center" else (float(rng.uniform()), float(rng.uniform()))
    frames = resize_and_crop(torch.from_numpy(array).permute(0, 3, 1, 2), spec, crop_at)
    if image_path:
        image = resize_and_crop(load_image(image_path).unsqueeze(0), spec, crop_at)[0]
    else:
        image = frames[0]
    return frames, image


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [-1, 1]. Applied on the training device: uint8 travels 4x lighter."""
    return pixels.float() / 127.5 - 1.0
