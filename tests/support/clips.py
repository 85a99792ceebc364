"""Real mp4 clips made for tests: encoded with ffmpeg (imageio-ffmpeg's binary), with known motion."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch


def write_clip(path: Path, frames: np.ndarray, fps: float) -> Path:
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 with ffmpeg (imageio-ffmpeg's binary)."""
    from svdray.sample import write_mp4

    return write_mp4(frames, path, fps)


def moving_square_clip(num_frames: int = 48, size: int = 64, seed: int = 0) -> np.ndarray:
    """A bright square sliding across a gradient: real motion a tiny model can learn."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 160, size, dtype=np.float32)[None, :, None].repeat(size, 0).repeat(3, 2)
    color = rng.integers(120, 255, 3)
    frames = []
    for t in range(num_frames):
        frame = base.copy()
        x = (4 + 2 * t) % (size - 16)
        frame[20:36, x : x + 16] = color
        frames.append(frame)
    return np.stack(frames).astype(np.uint8)


def ffmpeg_clip(path: Path, width: int, height: int, seconds: float, fps: float) -> Path:
    """A test-pattern clip of any size (odd ones too) and length, made by ffmpeg."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i"]
    command += [f"testsrc=size={width}x{height}:rate={fps}:duration={seconds}"]
    command += ["-c:v", "libx264", "-pix_fmt", pix_fmt, str(path)]
    subprocess.run(command, check=True)
    return path


def square_at_times(times: np.ndarray, size: int = 64) -> np.ndarray:
    """Frames whose square's x position is a function of time alone (10 px per second)."""
    frames = np.zeros((len(times), size, size, 3), np.uint8)
    for i, t in enumerate(times):
        x = int(round(4 + 10 * t))
        frames[i, 24:40, x : x + 8] = 255
    return frames


def square_x(frames: torch.Tensor) -> np.ndarray:
    """Column centre of the bright square in each (T, 3, H, W) frame."""
    mass = frames.float().mean(dim=(1, 2))  # (T, W)
    cols = torch.arange(frames.shape[-1]).float()
    return ((mass * cols).sum(1) / mass.sum(1)).numpy()


# A vfr clip: 40 frames at 30 fps, then 10 fps (frame N shown at vfr_time(N)).
VFR_SETPTS = "setpts='if(lt(N,40),N/30,40/30+(N-40)/10)/TB'"


def vfr_time(n: np.ndarray) -> np.ndarray:
    return np.where(n < 40, n / 30, 40 / 30 + (n - 40) / 10)


def make_vfr_square(path: Path) -> Path:
    """A VFR clip whose square sits at x = 4 + 10 t px at time t (encoded CFR, then retimed)."""
    times = vfr_time(np.arange(60))
    cfr = write_clip(path.with_suffix(".cfr.mp4"), square_at_times(times), 30)
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(cfr)]
    command += ["-vf", VFR_SETPTS, "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(command, check=True)
    return path
