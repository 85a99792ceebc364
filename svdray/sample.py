"""Sampling videos with the diffusers pipeline, optionally with a trained LoRA, and writing mp4s.

Training validation, `svdray sample` and the demo all come through `sample_video`, so what is
logged during training is what a user gets from the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svdray.model.lora import load_lora
from svdray.model.pipeline import load_pipeline


def load_sampling_pipeline(
    pretrained: str | Path,
    lora_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(pretrained, dtype, variant, revision)
    if lora_dir:
        load_lora(pipe.unet, lora_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_video(
    pipe,
    image: Image.Image,
    height: int,
    width: int,
    num_frames: int,
    steps: int = 25,
    fps: int = 7,
    motion_bucket_id: int = 127,
    noise_aug_strength: float = 0.02,
    min_guidance: float = 1.0,
    max_guidance: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """(T, H, W, 3) uint8 frames. `fps` is the real frame rate; the pipeline applies SVD's fps - 1."""
    generator = torch.Generator("cpu").manual_seed(seed)
    frames = pipe(
        image.convert("RGB").resize((width, height), Image.BICUBIC),
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        fps=fps,
        motion_bucket_id=motion_bucket_id,
        noise_aug_strength=noise_aug_strength,
        min_guidance_scale=min_guidance,
        max_guidance_scale=max_guidance,
        generator=generator,
        decode_chunk_size=min(num_frames, 8),
        output_type="np",
    ).frames[0]
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """H.264 mp4 (yuv420p, playable everywhere) from (T, H, W, 3) uint8 frames."""
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        output_params=["-crf", "18"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def write_preview(frames: np.ndarray, path: str | Path, columns: int = 8, scale: int = 1) -> Path:
    """All frames tiled into one PNG: easier to judge at a glance than a tiny video."""
    count, height, width = frames.shape[:3]
    rows = -(-count // columns)
    grid = np.zeros((rows * height, min(count, columns) * width, 3), np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = frame
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    image.save(path)
    return path
