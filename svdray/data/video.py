"""Decoding one training example: frames sampled by timestamp, resized, cropped; and probing a clip.

decord seeks to the keyframe before the first wanted frame and decodes forward only as far as the
last wanted one (`get_batch` on sparse indices), so a long source clip costs about as much as a
short one. Large sources are scaled by decord while it converts each wanted frame to RGB (to an
intermediate twice the final size, so the last, antialiased resize still has pixels to average):
measured on a 1080p clip, that halves the decode time at the same output quality.

Clips and images may be objects in a bucket (s3://, gs://; svdray.storage): a clip is read once
per decode, into memory (decord decodes from the bytes) or, above IN_MEMORY_BYTES, into a
temporary file, and a missing or unreadable object gets the reason code a local file would.

torch is imported where frames become tensors, not with the module: probing (`probe_video`,
`probe_image`) needs only decord and PIL, and runs in processes (prepare's probe tasks, Ray
Data's coordinators that unpickle the decoder) where importing torch would be most of their
start-up cost.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from svdray import storage

if TYPE_CHECKING:
    import torch

# Reason codes: stable, short, one per kind of problem a user can fix (they group the rejects).
VIDEO_NOT_FOUND = "video_not_found"
NOT_A_FILE = "not_a_file"
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
NOT_A_VIDEO = "not_a_video"
NO_VIDEO_STREAM = "no_video_stream"
UNSUPPORTED_CODEC = "unsupported_codec"
DECODE_FAILED = "decode_failed"
TOO_SHORT = "too_short"
START_OUT_OF_RANGE = "start_out_of_range"
IMAGE_NOT_FOUND = "image_not_found"
UNREADABLE_IMAGE = "unreadable_image"


# An object in a bucket up to this size is decoded from memory; a larger one from a temporary
# file (decord copies a file object's whole content into memory, next to the decoded frames).
IN_MEMORY_BYTES = 256 * 2**20


class ClipError(ValueError):
    """A clip that cannot be used: the file, what is wrong, and a reason code."""

    def __init__(self, message: str, reason: str = DECODE_FAILED):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FrameSpec:
    num_frames: int
    fps: float
    height: int
    width: int
    start: str = "first"  # "first" | "random"
    crop: str = "center"  # "center" | "random"


def frame_indices(
    timestamps: np.ndarray,
    spec: FrameSpec,
    rng: np.random.Generator,
    path: str,
    start_frame: int | None = None,
) -> np.ndarray:
    """Indices of the source frames showing times start + i / spec.fps, i < num_frames.

    Working from each frame's own timestamp (not index * fps) keeps motion speed the same for
    24, 25 and 29.97 fps sources and handles variable frame rate. `start_frame` (from the
    manifest) pins the window's start to that source frame; otherwise `spec.start` chooses.
    """
    span = (spec.num_frames - 1) / spec.fps
    if start_frame is not None:
        if not 0 <= start_frame < len(timestamps):
            raise ClipError(
                f"{path}: start_frame {start_frame} is outside the clip's {len(timestamps)} frames",
                START_OUT_OF_RANGE,
            )
        start = float(timestamps[start_frame])
        if start + span > float(timestamps[-1]) + 1e-6:
            raise ClipError(
                f"{path}: too short after start_frame {start_frame}: {timestamps[-1] - start:.2f}s left, "
                f"{spec.num_frames} frames at {spec.fps:g} fps need {span:.2f}s",
                TOO_SHORT,
            )
    else:
        first = float(timestamps[0])
        last_start = float(timestamps[-1]) - first - span
        if last_start < -1e-6:
            raise ClipError(
                f"{path}: too short: {timestamps[-1] - first:.2f}s of video, {spec.num_frames} frames at "
                f"{spec.fps:g} fps need {span:.2f}s",
                TOO_SHORT,
            )
        start = first + (0.0 if spec.start == "first" else float(rng.uniform(0.0, max(last_start, 0.0))))
    wanted = start + np.arange(spec.num_frames) / spec.fps
    idx = np.searchsorted(timestamps, wanted + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(timestamps) - 1)


def cover_size(height: int, width: int, spec: FrameSpec) -> tuple[int, int]:
    """The smallest size with the source's aspect ratio that covers spec.height x spec.width."""
    scale = max(spec.height / height, spec.width / width)
    return max(spec.height, math.ceil(height * scale)), max(spec.width, math.ceil(width * scale))


def resize_and_crop(frames: torch.Tensor, spec: FrameSpec, crop_at: tuple[float, float]) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (T, 3, spec.height, spec.width) uint8: cover-resize, then crop.

    The resize is antialiased bilinear on uint8 in channels-last layout, torch's vectorised
    path (about 20x faster than the same resize in float32). `crop_at` is the crop's relative
    position (0.5, 0.5 = centre), shared by a clip and its conditioning image so both frame the
    same content.
    """
    import torch

    _, _, h, w = frames.shape
    new_h, new_w = cover_size(h, w, spec)
    if (new_h, new_w) != (h, w):
        frames = torch.nn.functional.interpolate(
            frames.contiguous(memory_format=torch.channels_last),
            size=(new_h, new_w),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    top = round((new_h - spec.height) * crop_at[0])
    left = round((new_w - spec.width) * crop_at[1])
    return frames[:, :, top : top + spec.height, left : left + spec.width].contiguous()


@dataclass
class MediaFile:
    """A clip or image as decord, PIL and the MP4 box reader open it: `source` is the local path,
    or an object's bytes; `size` and `mtime_ns` identify its content (the latent cache's key)."""

    path: str  # as the manifest names it (a local path or an object URI)
    source: str | bytes
    size: int
    mtime_ns: int

    def open(self) -> Any:
        """A binary file object over the content."""
        return io.BytesIO(self.source) if isinstance(self.source, bytes) else open(self.source, "rb")


@contextlib.contextmanager
def fetched(path: str, kind: str = "video") -> Iterator[MediaFile]:
    """The `kind` ("video" or "image") file at `path`, checked: a local file as it is; an object
    in a bucket read into memory (into a temporary file above IN_MEMORY_BYTES, deleted
    afterwards). A ClipError names the file and what is wrong, with the reason code of a local
    file: video_not_found / image_not_found, else not_a_file, empty_file, unreadable_file (an
    image's are all unreadable_image, as PIL's own failures are)."""

    def problem(message: str, reason: str) -> ClipError:
        return ClipError(f"{path}: {message}", UNREADABLE_IMAGE if kind == "image" else reason)

    missing = IMAGE_NOT_FOUND if kind == "image" else VIDEO_NOT_FOUND
    if not storage.is_remote(path):
        if not os.path.exists(path):
            if os.path.islink(path):
                target = os.readlink(path)
                raise ClipError(
                    f"{path}: {kind} not found (a symbolic link to {target}, which does not exist)", missing
                )
            raise ClipError(f"{path}: {kind} not found", missing)
        if not os.path.isfile(path):
            raise problem("not a file", NOT_A_FILE)
        stat = os.stat(path)
        if stat.st_size == 0:
            raise problem("empty file (0 bytes)", EMPTY_FILE)
        if not os.access(path, os.R_OK):
            raise problem("cannot read the file (permission denied)", UNREADABLE_FILE)
        yield MediaFile(path, path, stat.st_size, stat.st_mtime_ns)
        return
    with contextlib.ExitStack() as stack:
        try:  # only the store's calls: what the caller does with the file is not a read error
            info = storage.info(path)
            if info.type == storage.pafs.FileType.NotFound:
                raise ClipError(f"{path}: {kind} not found", missing)
            if info.type != storage.pafs.FileType.File:
                raise problem("not a file", NOT_A_FILE)
            if not info.size:
                raise problem("empty file (0 bytes)", EMPTY_FILE)
            if info.size <= IN_MEMORY_BYTES:
                source: str | bytes = storage.read_bytes(path)
            else:
                source = str(stack.enter_context(storage.local_copy(path)))
        except OSError as err:  # denied, unreachable: in the store's own words
            raise problem(f"cannot read the object ({_first_line(err)})", UNREADABLE_FILE) from err
        yield MediaFile(path, source, info.size, storage.mtime_ns(info))


def load_image(path: str) -> torch.Tensor:
    """An RGB image as (3, H, W) uint8, whatever its mode (grayscale, RGBA, 16-bit, palette).

    EXIF orientation is applied (phone photos are stored sideways with a rotation tag);
    transparency is composited on white; 16-bit and 32-bit integer images are scaled to 8 bits.
    """
    import torch

    with fetched(path, "image") as image:
        return torch.from_numpy(_load_image(image)).permute(2, 0, 1)


def _load_image(image: MediaFile) -> np.ndarray:
    """(H, W, 3) uint8."""
    path = image.path
    try:
        with image.open() as f, Image.open(f) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                low, high = min(array.min(), 0.0), max(array.max(), 1.0)
                img = Image.fromarray(((array - low) / (high - low) * 255).round().astype(np.uint8))
            if img.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            rgb = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises many types for broken files
        raise ClipError(f"{path}: unreadable image ({type(err).__name__}: {err})", UNREADABLE_IMAGE) from err
    return rgb.copy()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def open_video(video: MediaFile, size: tuple[int, int] | None = None):
    """A decord VideoReader of a `fetched` clip (frames scaled to `size` = (height, width) if
    given), or ClipError naming the file and why it cannot be read."""
    import decord  # imported here so that processes that never decode need not load it

    path = video.path
    height, width = size if size else (-1, -1)
    source = io.BytesIO(video.source) if isinstance(video.source, bytes) else video.source
    try:
        reader = decord.VideoReader(source, ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as err:
        message = _first_line(err)
        if "video stream" in message:
            codec = video_codec(video)
            if codec:
                raise ClipError(
                    f"{path}: its video is {codec}, which decord's FFmpeg cannot decode; re-encode it, "
                    "e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4",
                    UNSUPPORTED_CODEC,
                ) from err
            raise ClipError(f"{path}: the file has no video stream", NO_VIDEO_STREAM) from err
        if "av_read_frame" in message:  # the index opened, the frame data did not
            message = f"{path}: frames cannot be read (truncated or corrupt file)"
            raise ClipError(message, DECODE_FAILED) from err
        raise ClipError(
            f"{path}: not a readable video (not a video format, or its index is missing: truncated file)",
            NOT_A_VIDEO,
        ) from err
    return reader


def video_codec(video: MediaFile) -> str | None:
    """The codec of the file's first video stream as FFmpeg names it, or None if it has none.

    Asked of imageio-ffmpeg's FFmpeg, which reads more codecs (AV1, VP9) than decord's build: only
    for files where decord finds no video stream, to tell "no video" from "video it cannot decode".
    """
    import re
    import subprocess

    import imageio_ffmpeg

    in_memory = isinstance(video.source, bytes)
    try:
        probe = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", "pipe:0" if in_memory else video.source],
            capture_output=True,
            input=video.source if in_memory else None,
            stdin=None if in_memory else subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Stream #\d+:\d+.*?: Video: (\w+)", probe.stderr.decode(errors="replace"))
    return found.group(1) if found else None


def frame_timestamps(reader, path: str) -> np.ndarray:
    """Each frame's presentation time in seconds, from the container.

    Containers without usable times (all equal, or going backwards overall) fall back to
    index / average fps, the only information left.
    """
    count = len(reader)
    times = reader.get_frame_timestamp(np.arange(count))[:, 0].astype(np.float64)
    if count > 1 and not times[-1] > times[0]:
        fps = reader.get_avg_fps()
        if not fps > 0:
            raise ClipError(f"{path}: the video has no frame times and no frame rate", DECODE_FAILED)
        times = np.arange(count) / fps
    return np.maximum.accumulate(times)  # a stray out-of-order time must not break the search


def _decode_error(path: str, err: BaseException) -> ClipError:
    return ClipError(f"{path}: decoding failed ({_first_line(err)[:200]})", DECODE_FAILED)


def probe_video(path: str, start_frame: int | None = None) -> dict[str, Any]:
    """Facts about a clip, checking that its first and last frames decode: frames, fps, size,
    duration, file identity (and the time of `start_frame`, if given). A truncated file fails
    here, at its last frame."""
    with fetched(path) as video:
        return _probe_video(video, start_frame)


def _probe_video(video: MediaFile, start_frame: int | None) -> dict[str, Any]:
    path = video.path
    reader = open_video(video)
    try:
        count = len(reader)
        times = frame_timestamps(reader, path)
        if start_frame is not None and not 0 <= start_frame < count:
            raise ClipError(
                f"{path}: start_frame {start_frame} is outside the clip's {count} frames", START_OUT_OF_RANGE
            )
        ends = reader.get_frame_timestamp([count - 1])[0]
        pixels = reader.get_batch([0, count - 1] if count > 1 else [0]).asnumpy()
    except ClipError:
        raise
    except Exception as err:
        raise _decode_error(path, err) from err
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise ClipError(f"{path}: frames of unexpected shape {pixels.shape}", DECODE_FAILED)
    gaps = np.diff(times)
    start = {} if start_frame is None else {"start_time": round(float(times[start_frame]), 4)}
    return {
        **start,
        "rotation": display_rotation(video),  # already applied: height and width are as displayed
        "frames": count,
        "fps": round(float(reader.get_avg_fps()), 4),
        "height": int(pixels.shape[1]),
        "width": int(pixels.shape[2]),
        "duration": round(float(max(ends[1], times[-1])), 4),
        "last_frame_time": round(float(times[-1]), 4),
        "first_frame_time": round(float(times[0]), 4),
        # Variable frame rate: frame gaps that differ by more than 10% of the typical gap.
        "vfr": bool(len(gaps) > 1 and np.ptp(gaps) > 0.1 * max(float(np.median(gaps)), 1e-6)),
        "size": video.size,
        "mtime_ns": video.mtime_ns,
    }


def probe_image(path: str) -> dict[str, Any]:
    """Facts about a conditioning image, checking that it loads and converts to RGB."""
    with fetched(path, "image") as image:
        rgb = _load_image(image)
        with image.open() as f, Image.open(f) as img:
            mode = img.mode
    return {
        "image_height": int(rgb.shape[0]),
        "image_width": int(rgb.shape[1]),
        "image_mode": mode,
        "image_size": image.size,
        "image_mtime_ns": image.mtime_ns,
    }


def display_rotation(video: MediaFile) -> int:
    """Degrees a player turns the first video track of an MP4/MOV file by (its display matrix:
    phones record sideways and set it); 0 for other files and unrotated tracks.

    decord applies the rotation to full-size frames, but returns broken 4-channel frames when it
    is also asked to scale them: rotated clips are decoded at full size. Only box headers and the
    two small boxes needed are read, so this costs a few reads however long the clip is.
    """
    import struct

    def boxes(f, start: int, end: int):
        while start + 8 <= end:
            f.seek(start)
            size, kind = struct.unpack(">I4s", f.read(8))
            header = 8
            if size == 1:
                (size,) = struct.unpack(">Q", f.read(8))
                header = 16
            elif size == 0:
                size = end - start
            if size < header:
                return
            yield kind.decode("latin-1"), start + header, min(start + size, end)
            start += size

    def rotation_of(f, start: int, end: int) -> int | None:
        matrix, handler = None, None
        for kind, body, stop in boxes(f, start, end):
            if kind == "tkhd":
                f.seek(body)
                version = f.read(1)[0]
                f.seek(body + 4 + (32 if version == 1 else 20) + 16)
                a, b = struct.unpack(">ii", f.read(8))
                matrix = (a, b)
            elif kind == "mdia":
                for inner, inner_body, _ in boxes(f, body, stop):
                    if inner == "hdlr":
                        f.seek(inner_body + 8)
                        handler = f.read(4)
        if handler != b"vide" or matrix is None:
            return None
        return round(math.degrees(math.atan2(-matrix[1], matrix[0]))) % 360

    try:
        with video.open() as f:
            end = video.size
            for kind, body, stop in boxes(f, 0, end):
                if kind == "moov":
                    for inner, inner_body, inner_stop in boxes(f, body, stop):
                        if inner == "trak":
                            rotation = rotation_of(f, inner_body, inner_stop)
                            if rotation is not None:
                                return rotation
    except (OSError, struct.error, IndexError):
        return 0  # not an MP4/MOV file, or a broken one: decord's own errors name the problem
    return 0


def decode_size(source: tuple[int, int] | None, spec: FrameSpec) -> tuple[int, int] | None:
    """What decord should scale frames to while decoding: twice the cover size when the source is
    larger than that (then an antialiased resize), else None (full size, antialiased resize)."""
    if not source:
        return None
    cover_h, cover_w = cover_size(source[0], source[1], spec)
    if source[0] <= 2 * cover_h or source[1] <= 2 * cover_w:
        return None
    return 2 * cover_h, 2 * cover_w


def _scaled_frames(reader, indices: np.ndarray) -> np.ndarray | None:
    """Frames decord scaled while decoding, or None where its scaling breaks (it fails, or returns
    4-channel frames, for some widths from 8 to 72 px and for rotated clips): decode at full size."""
    try:
        array = reader.get_batch(indices.tolist()).asnumpy()
    except Exception:
        return None
    return array if array.shape[-1] == 3 else None


def _decode_frames(
    video: MediaFile,
    spec: FrameSpec,
    rng: np.random.Generator,
    start_frame: int | None,
    source_size: tuple[int, int] | None,
) -> np.ndarray:
    """The planned frames of a fetched clip, (T, H, W, 3) uint8 (scaled by decord when large)."""
    path = video.path
    scaled = None if display_rotation(video) else decode_size(source_size, spec)
    reader = open_video(video, scaled)
    try:
        timestamps = frame_timestamps(reader, path)
        indices = frame_indices(timestamps, spec, rng, path, start_frame)
    except ClipError:
        raise
    except Exception as err:
        raise _decode_error(path, err) from err
    array = _scaled_frames(reader, indices) if scaled else None
    if array is None:
        reader = open_video(video) if scaled else reader
        try:
            array = reader.get_batch(indices.tolist()).asnumpy()
        except Exception as err:
            raise _decode_error(path, err) from err
    return array


def decode_clip(
    video_path: str,
    spec: FrameSpec,
    seed: int,
    image_path: str | None = None,
    start_frame: int | None = None,
    source_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one example: (frames (T, 3, H, W) uint8, conditioning image (3, H, W) uint8).

    `seed` fixes the random start and crop, so a clip's frames depend only on (run seed, epoch,
    clip), not on which worker decodes it or when. `source_size` (height, width), known from
    `svdray prepare`, lets decord scale large frames while decoding.
    """
    import torch

    rng = np.random.default_rng(seed)
    with fetched(video_path) as video:
        array = _decode_frames(video, spec, rng, start_frame, source_size)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ClipError(f"{video_path}: decoded frames of unexpected shape {array.shape}", DECODE_FAILED)
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


# A float copy of a full-size clip (121 x 3 x 704 x 1280) is 1.3 GB: `motion_score` converts
# at most this many bytes of it at a time.
MOTION_CHUNK_BYTES = 64 * 2**20


def motion_score(frames: torch.Tensor) -> float:
    """How much a clip moves: the temporal std of each pixel in 0..255 units, averaged over pixels
    and channels. `frames` (T, 3, H, W) uint8.

    Computed a few rows of one channel at a time (see MOTION_CHUNK_BYTES), in the same float32
    operations as on the whole clip, then averaged over the whole (3, H, W) map of stds.
    """
    import torch

    if frames.ndim != 4:
        raise ValueError(f"motion_score expects frames (T, 3, H, W), got shape {tuple(frames.shape)}")
    steps, channels, height, width = frames.shape
    rows = max(1, MOTION_CHUNK_BYTES // (steps * width * 4))
    stds = torch.empty((channels, height, width), dtype=torch.float32, device=frames.device)
    for channel in range(channels):
        for top in range(0, height, rows):
            chunk = frames[:, channel, top : top + rows]
            stds[channel, top : top + rows] = (to_model_range(chunk).float() * 127.5).std(dim=0)
    return stds.mean().item()
