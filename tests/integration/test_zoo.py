"""A folder of clips no other test names (tests/zoo.py: codecs, containers, pixel formats,
rotation, odd timing and names, broken files) goes through `svdray prepare` and the training
stream: every file is accepted or rejected with the expected reason, every accepted clip decodes
to the same picture as the plain H.264 one, and one epoch of the stream feeds each of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from svdray.config import DataConfig
from svdray.data.dataset import build_training_dataset, decode_item, plan_item
from svdray.data.prepare import prepare
from svdray.data.video import FrameSpec, decode_clip
from tests.support.zoo import make_zoo

NUM_FRAMES, FPS = 8, 7.0
# The same test pattern, at the same time, in another codec, container or pixel format.
SAME_PICTURE = [
    "hevc.mp4",
    "mpeg4.avi",
    "mjpeg.mov",
    "prores.mov",
    "ffv1.mkv",
    "h264_10bit.mp4",
    "h264_444.mp4",
    "h264_rgb.mkv",
    "offset_start.mp4",
    "UPPER.MP4",
    "día de campo 1.mp4",
    "nested/deeper/clip.mp4",
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("zoo") / "clips"
    return root, make_zoo(root)


@pytest.fixture(scope="module")
def prepared(ray_cluster, zoo, tmp_path_factory):
    root, _ = zoo
    return prepare(root, tmp_path_factory.mktemp("zoo-prepared"), NUM_FRAMES, FPS, cpus=0.5)


def test_every_file_accepted_or_rejected_with_its_reason(zoo, prepared):
    root, expected = zoo
    outcomes = {row["clip_id"]: "ok" for row in prepared.rows}
    outcomes.update({reject.clip_id: reject.reason for reject in prepared.rejects})
    assert outcomes == expected
    for reject in prepared.rejects:
        assert str(root / reject.clip_id) in reject.message or reject.reason == "duplicate", reject
    av1 = next(r for r in prepared.rejects if r.clip_id == "av1.mkv")
    assert "av1" in av1.message and "re-encode" in av1.message
    gone = next(r for r in prepared.rejects if r.clip_id == "gone.mp4")
    assert "symbolic link" in gone.message


def first_frames(path: Path, height: int, width: int, source: tuple[int, int] | None = None) -> np.ndarray:
    spec = FrameSpec(NUM_FRAMES, FPS, height, width, start="first")
    frames, _ = decode_clip(str(path), spec, 0, source_size=source)
    return frames.numpy().astype(np.float32)


def test_accepted_clips_decode_to_the_same_picture(zoo, prepared):
    root, _ = zoo
    reference = first_frames(root / "h264.mp4", 64, 96)
    for name in SAME_PICTURE:
        frames = first_frames(root / name, 64, 96)
        assert np.abs(frames - reference).mean() < 8, name  # lossy codecs differ a little
    gray = first_frames(root / "gray.mp4", 64, 96)
    assert np.abs(gray - reference.mean(axis=1, keepdims=True)).mean() < 25  # luma only
    assert np.ptp(gray, axis=1).max() < 3  # the three channels are equal

    # A phone clip flagged as rotated by 90 degrees is decoded upright (as players show it),
    # probed as portrait, and scaled while decoding without decord's 4-channel frames.
    row = next(r for r in prepared.rows if r["clip_id"] == "phone_rotated.mp4")
    assert (row["rotation"], row["height"], row["width"]) == (90, 96, 64)
    upright = np.rot90(reference, k=1, axes=(2, 3))
    assert np.abs(first_frames(root / "phone_rotated.mp4", 96, 64) - upright).mean() < 3
    small = first_frames(root / "phone_rotated.mp4", 24, 16, source=(96, 64))
    assert small.shape == (NUM_FRAMES, 3, 24, 16)
    reference_small = first_frames(root / "h264.mp4", 16, 24, source=(64, 96))
    assert np.abs(small - np.rot90(reference_small, k=1, axes=(2, 3))).mean() < 6

    # Every accepted clip decodes at a training size, whatever its shape and timing.
    cfg = DataConfig(num_frames=NUM_FRAMES, height=32, width=48, fps=FPS)
    for row in prepared.rows:
        frames, image = decode_item(plan_item(row, (32, 48), 0, 0), cfg, 0)
        assert frames.shape == (NUM_FRAMES, 3, 32, 48) and image.shape == (3, 32, 48), row["clip_id"]


def test_one_epoch_of_the_stream_feeds_every_accepted_clip(ray_cluster, prepared):
    cfg = DataConfig(num_frames=NUM_FRAMES, height=32, width=48, fps=FPS, decode_cpus=0.5, decoders=2)
    rows = prepared.rows
    stream = build_training_dataset(rows, cfg, num_samples=len(rows), seed=0)
    fed = []
    for block in stream.iter_batches(batch_size=None, batch_format="numpy"):
        fed.extend(str(c) for c in block["clip_id"])
        if len(fed) >= len(rows):
            break
    assert sorted(fed[: len(rows)]) == sorted(r["clip_id"] for r in rows)
