"""`svdray prepare` and training on real-world data: every fault a file the test makes, strict
mode, and an epoch that feeds every accepted clip exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from svdray import cli
from svdray.config import DataConfig
from svdray.data.manifest import DataError, write_manifest
from svdray.data.prepare import load_prepared, prepare, training_rows
from svdray.data.video import FrameSpec, decode_clip, load_image
from tests.support.clips import (
    ffmpeg_clip,
    make_vfr_square,
    moving_square_clip,
    write_clip,
)


def mlflow_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("tests").experiment_id])


# manifest line -> expected outcome ("ok" or the reason code)
EXPECTED = {
    1: "ok",
    2: "ok",
    3: "ok",
    4: "ok",
    5: "ok",
    6: "ok",
    7: "ok",
    8: "video_not_found",
    9: "empty_file",
    10: "not_a_video",
    11: "decode_failed",
    12: "not_a_video",
    13: "too_short",
    14: "unreadable_image",
    15: "no_video",
    16: "duplicate",
    17: "invalid_row",
    18: "no_video_stream",
    19: "start_out_of_range",
    20: "bad_value",
    21: "not_a_file",
    22: "ok",
    23: "image_not_found",
}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """A manifest with relative paths over clips and images that break in every way listed."""
    import subprocess

    import imageio_ffmpeg

    root = tmp_path_factory.mktemp("messy")
    clips, images = root / "clips", root / "images"
    images.mkdir()
    square = write_clip(clips / "square.mp4", moving_square_clip(48), fps=24)
    ffmpeg_clip(clips / "portrait.mp4", 40, 72, 2, 24)
    ffmpeg_clip(clips / "odd.mp4", 63, 47, 2, 25)
    make_vfr_square(clips / "vfr.mp4")
    (clips / "empty.mp4").write_bytes(b"")
    data = square.read_bytes()
    (clips / "truncated.mp4").write_bytes(data[: len(data) // 2])
    faststart = clips / "faststart.mp4"
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    subprocess.run(
        [ffmpeg, "-y", "-loglevel", "error", "-i", str(square), "-c", "copy", "-movflags", "+faststart"]
        + [str(faststart)],
        check=True,
    )
    data = faststart.read_bytes()
    (clips / "truncated_faststart.mp4").write_bytes(data[: len(data) * 4 // 5])  # index intact, frames cut
    faststart.unlink()
    (clips / "notes.mp4").write_text("this is a text file, not a video\n")
    write_clip(clips / "short.mp4", moving_square_clip(5), fps=10)
    subprocess.run(
        [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=1",
            str(clips / "audio.mp4"),
        ],
        check=True,
    )
    (clips / "folder.mp4").mkdir()
    gray = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    Image.fromarray(gray).save(images / "gray.png")
    Image.fromarray(np.dstack([gray, gray, gray, gray])).save(images / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "deep.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)

    lines = [
        {"video": "clips/square.mp4", "prompt": "a square"},
        {"video": "clips/portrait.mp4"},
        {"video": "clips/odd.mp4"},
        {"video": "clips/vfr.mp4"},
        {"video": "clips/square.mp4", "image": "images/gray.png"},
        {"video": "clips/odd.mp4", "image": "images/rgba.png"},
        {"video": "clips/portrait.mp4", "image": "images/deep.png", "fps": 6},
        {"video": "clips/missing.mp4"},
        {"video": "clips/empty.mp4"},
        {"video": "clips/truncated.mp4"},
        {"video": "clips/truncated_faststart.mp4"},
        {"video": "clips/notes.mp4"},
        {"video": "clips/short.mp4"},
        {"video": "clips/square.mp4", "image": "images/broken.png"},
        {"prompt": "a row without a video"},
        {"video": "clips/square.mp4", "prompt": "the same clip again"},
        '{"video": oops}',
        {"video": "clips/audio.mp4"},
        {"video": "clips/square.mp4", "start_frame": 1000},
        {"video": "clips/portrait.mp4", "fps": "fast"},
        {"video": "clips/folder.mp4"},
        {"video": "clips/square.mp4", "start_frame": 10},
        {"video": "clips/square.mp4", "image": "images/missing.png"},
    ]
    manifest = root / "messy.jsonl"
    manifest.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return manifest


def test_prepare_sorts_every_fault(ray_cluster, messy, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["prepare", "--manifest", str(messy), "--out", str(out), "--num-frames", "8", "--fps", "7"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    accepted = [line for line, reason in EXPECTED.items() if reason == "ok"]
    assert f"accepted              {len(accepted)}" in printed
    assert f"rejected              {len(EXPECTED) - len(accepted)}" in printed
    assert "40x72: " in printed and "63x47: " in printed and "variable frame rate: 1" in printed

    prepared = load_prepared(out)
    assert [r["clip_id"] for r in prepared.rows] == [f"messy.jsonl:{n}" for n in accepted]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["clip_id"]: r["reason"] for r in rejects} == {
        f"messy.jsonl:{n}": reason for n, reason in EXPECTED.items() if reason != "ok"
    }
    messages = {r["clip_id"]: r["message"] for r in rejects}
    assert "messy.jsonl:17: not valid JSON" in messages["messy.jsonl:17"]
    assert "same clip as messy.jsonl:1" in messages["messy.jsonl:16"]
    assert "missing.mp4: video not found" in messages["messy.jsonl:8"]
    assert "'fps' must be a number" in messages["messy.jsonl:20"]

    rows = {r["clip_id"]: r for r in prepared.rows}
    assert (rows["messy.jsonl:2"]["width"], rows["messy.jsonl:2"]["height"]) == (40, 72)
    assert (rows["messy.jsonl:3"]["width"], rows["messy.jsonl:3"]["height"]) == (63, 47)
    assert rows["messy.jsonl:4"]["vfr"] and not rows["messy.jsonl:1"]["vfr"]
    assert rows["messy.jsonl:22"]["start_time"] == pytest.approx(10 / 24, abs=1e-3)
    assert [rows[f"messy.jsonl:{n}"]["image_mode"] for n in (5, 6, 7)] == ["L", "RGBA", "I;16"]
    assert rows["messy.jsonl:1"]["video"] == str(messy.parent / "clips" / "square.mp4")

    # Every accepted row decodes, its image converted to RGB and framed like its clip.
    for row in prepared.rows:
        spec = FrameSpec(8, row.get("fps", 7.0), 32, 32, "first", "center")
        frames, image = decode_clip(row["video"], spec, 0, row.get("image"), row.get("start_frame"))
        assert frames.shape == (8, 3, 32, 32) and image.shape == (3, 32, 32)
    deep = load_image(str(messy.parent / "images" / "deep.png"))
    assert deep.dtype == torch.uint8 and int(deep.max()) == 255  # 16-bit scaled, not clipped
    rgba = load_image(str(messy.parent / "images" / "rgba.png"))
    assert rgba.shape[0] == 3

    # data.strict stops before training and lists every bad row; more frames reject more rows.
    strict = DataConfig(manifest=str(out), num_frames=8, fps=7.0, strict=True)
    with pytest.raises(DataError) as err:
        training_rows(strict, tmp_path / "work")
    for n, reason in EXPECTED.items():
        if reason != "ok":
            assert f"[{reason}]" in str(err.value) and f"messy.jsonl:{n}" in str(err.value)
    longer = training_rows(DataConfig(manifest=str(out), num_frames=14, fps=7.0), tmp_path / "work")
    # 14 frames at 7 fps span 1.86 s: line 22 starts 0.42 s into a 1.96 s clip, line 7 asks 6 fps.
    too_short = {r.clip_id for r in longer.rejects if r.reason == "too_short"}
    assert too_short == {"messy.jsonl:7", "messy.jsonl:13", "messy.jsonl:22"}
    assert len(longer.rows) == len(accepted) - 2


def test_training_feeds_every_accepted_clip_once(
    ray_cluster, tmp_path, square_clip, write_config, monkeypatch
):
    """Two workers, one epoch: each clip that still decodes is fed once; one that broke after
    `prepare` is skipped and counted; rejected rows are counted in MLflow; the run finishes."""
    # mlflow.set_tracking_uri (called by an earlier run in this process) exports the variable.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clips = tmp_path / "clips"
    write_clip(clips / "square.mp4", moving_square_clip(48, seed=1), fps=24)
    ffmpeg_clip(clips / "portrait.mp4", 40, 72, 2, 24)
    ffmpeg_clip(clips / "odd.mp4", 63, 47, 2, 25)
    ffmpeg_clip(clips / "wide.mp4", 96, 40, 2, 30)
    shutil.copy(square_clip, clips / "victim.mp4")
    (clips / "notes.mp4").write_text("not a video")
    names = ["square", "portrait", "missing", "odd", "wide", "notes", "victim"]
    manifest = write_manifest([{"video": f"clips/{n}.mp4"} for n in names], tmp_path / "train.jsonl")
    prepared = prepare(manifest, tmp_path / "prepared", num_frames=8, fps=7.0)
    assert len(prepared.rows) == 5
    (clips / "victim.mp4").write_text("overwritten after prepare")  # now fails to decode

    path = write_config(
        tmp_path / "prepared",
        data={"start": "random", "crop": "random", "decoders": 2},  # two decoders, one order
        train={"name": "epoch", "num_workers": 2, "max_steps": 2, "batch_size": 1, "checkpoint_every": 2},
    )
    assert cli.main(["train", "--config", str(path)]) == 0

    report = json.loads((tmp_path / "out" / "data" / "report.json").read_text())
    good = {r["clip_id"] for r in prepared.rows} - {"train.jsonl:7"}
    assert report["times_fed"] == {clip: 1 for clip in good}
    assert report["fed_per_rank"] == {"0": 2, "1": 2}
    assert {(f["clip_id"], f["reason"]) for f in report["failures"]} == {("train.jsonl:7", "not_a_video")}

    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    counts = {k: int(v) for k, v in run.data.tags.items() if k.startswith("data.")}  # tags, not charts
    assert counts["data.accepted"] == 5 and counts["data.rejected"] == 2
    assert counts["data.rejected.video_not_found"] == 1 and counts["data.rejected.not_a_video"] == 1
    assert counts["data.clips_fed"] == 4 and counts["data.samples_fed"] == 4
    assert counts["data.decode_failures"] >= 1
    assert not any(key.startswith("data.") for key in run.data.metrics)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/report.json", "data/run_rejects.jsonl", "data/summary.txt"} <= artifacts


def test_strict_training_stops_before_it_starts(
    ray_cluster, tmp_path, square_clip, write_config, capsys, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # see above
    manifest = write_manifest(
        [{"video": str(square_clip)}, {"video": str(tmp_path / "gone.mp4")}, {"image": "x.png"}],
        tmp_path / "m.jsonl",
    )
    path = write_config(manifest, data={"strict": True}, train={"name": "strict"})
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 bad row(s)" in err and "[video_not_found]" in err and "m.jsonl:2" in err
    assert "[no_video]" in err and "m.jsonl:3" in err
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert not (tmp_path / "out" / "ray").exists()  # no training was started
