"""A folder of clips svdray's other tests never name: codecs, containers, pixel formats, rotation,
odd timing, odd names, and files that are broken in ways a user's folder really has.

    python -m tests.support.zoo DIR      # writes the folder, for `svdray prepare --manifest DIR --out ...`

`make_zoo` returns {relative path: expected outcome}: "ok" for clips that must be accepted (and
decode at training size), else the reason code `svdray prepare` must give.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Test pattern with motion, 3 s at 25 fps, 96x64: big enough for decord, small enough to be quick.
SOURCE = "testsrc2=size=96x64:rate=25:duration=3"


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {done.stderr[-2000:]}")


def encode(path: Path, *options: str, source: str = SOURCE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", source, *options, str(path))
    return path


def pattern(width: int = 96, height: int = 64, fps: float = 25, seconds: float = 3) -> str:
    return f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"


H264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p")


def make_zoo(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    work = root.parent / f"{root.name}-sources"  # sources of derived files: not in the folder
    expected: dict[str, str] = {}

    def clip(name: str, *options: str, source: str = SOURCE, outcome: str = "ok") -> Path:
        expected[name] = outcome
        return encode(root / name, *options, source=source)

    # Codecs and containers people shoot and download in.
    clip("h264.mp4", *H264)
    clip("hevc.mp4", "-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params", "log-level=error")
    clip("mpeg4.avi", "-c:v", "mpeg4", "-q:v", "4")
    clip("mjpeg.mov", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "4")
    clip("prores.mov", "-c:v", "prores", "-profile:v", "2")
    clip("ffv1.mkv", "-c:v", "ffv1")
    # AV1 is real video that decord's FFmpeg cannot decode: a reject that says so.
    clip("av1.mkv", "-c:v", "libsvtav1", "-svtav1-params", "svt-log-level=0", outcome="unsupported_codec")
    # Pixel formats: 10-bit, 4:4:4, RGB, grayscale.
    clip("h264_10bit.mp4", "-c:v", "libx264", "-pix_fmt", "yuv420p10le")
    clip("h264_444.mp4", "-c:v", "libx264", "-pix_fmt", "yuv444p")
    clip("h264_rgb.mkv", "-c:v", "libx264rgb", "-pix_fmt", "rgb24")
    clip("gray.mp4", "-c:v", "libx264", "-pix_fmt", "gray")
    # Timing: a phone's rotation flag, 120 fps, 2 fps, a stream that starts at 10 s, a clip cut
    # without re-encoding (an edit list, starting between keyframes).
    upright = encode(work / "upright.mp4", *H264)
    expected["phone_rotated.mp4"] = "ok"
    ffmpeg("-display_rotation", "90", "-i", str(upright), "-c", "copy", str(root / "phone_rotated.mp4"))
    clip("fast_120fps.mp4", *H264, source=pattern(fps=120, seconds=2))
    clip("slow_2fps.mp4", *H264, source=pattern(fps=2, seconds=8))
    clip("offset_start.mp4", *H264, "-output_ts_offset", "10")
    long = encode(work / "long.mp4", *H264, "-g", "25", source=pattern(seconds=6))
    expected["cut_copy.mp4"] = "ok"
    ffmpeg("-ss", "0.7", "-i", str(long), "-t", "3", "-c", "copy", str(root / "cut_copy.mp4"))
    # Names and places: upper-case extension, spaces and non-ASCII, a sub-folder, a symlink to a
    # clip already in the folder (the same pixels: a duplicate).
    clip("UPPER.MP4", *H264)
    clip("día de campo 1.mp4", *H264)
    clip("nested/deeper/clip.mp4", *H264)
    (root / "link.mp4").symlink_to(root / "h264.mp4")
    expected["link.mp4"] = "duplicate"
    # Shapes: odd sizes, very wide, portrait.
    clip("odd_97x65.mp4", "-c:v", "libx264", "-pix_fmt", "yuv444p", source=pattern(97, 65))
    clip("wide_400x64.mp4", *H264, source=pattern(400, 64))
    clip("portrait_64x128.mp4", *H264, source=pattern(64, 128))

    # Broken files.
    data = (root / "h264.mp4").read_bytes()
    (root / "header_only.mp4").write_bytes(data[:48])
    expected["header_only.mp4"] = "not_a_video"
    noise = np.random.default_rng(0).integers(0, 256, 50_000, np.uint8)
    (root / "random_bytes.mov").write_bytes(noise.tobytes())
    expected["random_bytes.mov"] = "not_a_video"
    (root / "._h264.mp4").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 80)  # macOS AppleDouble
    expected["._h264.mp4"] = "not_a_video"
    picture = work / "picture.png"
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(picture)
    (root / "picture_named.mp4").write_bytes(picture.read_bytes())
    expected["picture_named.mp4"] = "not_a_video"
    (root / "gone.mp4").symlink_to(work / "deleted.mp4")
    expected["gone.mp4"] = "video_not_found"
    clip("three_frames.mp4", *H264, source=pattern(seconds=0.12), outcome="too_short")
    clip("silence.mp4", "-c:a", "aac", source="sine=duration=1", outcome="no_video_stream")
    return expected


if __name__ == "__main__":
    for name, outcome in make_zoo(Path(sys.argv[1])).items():
        print(f"{outcome:<16}{name}")
