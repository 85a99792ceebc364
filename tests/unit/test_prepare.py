"""Real-world data without a cluster: a variable-frame-rate clip sampled by timestamp, and every
source format reading the same rows (tests/integration/test_prepare.py: `svdray prepare`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from svdray.data.manifest import scan_manifest, write_manifest
from svdray.data.video import FrameSpec, decode_clip, load_image
from tests.support.clips import (
    make_vfr_square,
    square_x,
    vfr_time,
)


def test_variable_frame_rate_sampled_by_timestamp(tmp_path):
    path = make_vfr_square(tmp_path / "vfr.mp4")
    # 1.0 s .. 3.0 s crosses the switch from 30 to 10 fps at 1.33 s.
    frames, _ = decode_clip(str(path), FrameSpec(5, 2.0, 64, 64), seed=0, start_frame=30)
    shown = vfr_time(np.searchsorted(vfr_time(np.arange(60)), 1.0 + np.arange(5) / 2 + 1e-6, "right") - 1)
    np.testing.assert_allclose(square_x(frames), 4 + 4 + 10 * shown, atol=1.0)


def test_every_source_format_reads_the_same_rows(tmp_path, square_clip):
    import datasets

    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(square_clip, tmp_path / "clips" / name)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "cond.png")
    table = {
        "video": ["clips/a.mp4", "clips/b.mp4"],
        "image": ["cond.png", None],
        "prompt": ["first", "second"],
        "fps": [6.0, None],
        "start_frame": [None, 3],
    }
    want = [
        {
            "video": str(tmp_path / "clips/a.mp4"),
            "image": str(tmp_path / "cond.png"),
            "prompt": "first",
            "fps": 6.0,
        },
        {"video": str(tmp_path / "clips/b.mp4"), "prompt": "second", "start_frame": 3},
    ]

    def rows_of(path, media_dir=None):
        read = scan_manifest(path, media_dir)
        assert read.rejects == []
        return [{k: v for k, v in r.items() if k != "clip_id"} for r in read.rows]

    rows = [
        {k: v for k, v in zip(table, values, strict=True) if v is not None}
        for values in zip(*table.values(), strict=True)
    ]
    write_manifest(rows, tmp_path / "m.jsonl")
    assert rows_of(tmp_path / "m.jsonl") == want

    (tmp_path / "m.csv").write_text(
        "video,image,prompt,fps,start_frame\nclips/a.mp4,cond.png,first,6,\nclips/b.mp4,,second,,3\n"
    )
    assert rows_of(tmp_path / "m.csv") == want

    pq.write_table(pa.table(table), tmp_path / "m.parquet")
    assert rows_of(tmp_path / "m.parquet") == want

    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "hf"))
    assert rows_of(tmp_path / "hf") == want

    assert [r["video"] for r in rows_of(tmp_path / "clips")] == [want[0]["video"], want[1]["video"]]

    # A datasets Image column with the bytes embedded: written out once, readable as a file.
    embedded = datasets.Dataset.from_dict(
        {"video": [str(tmp_path / "clips/a.mp4")], "image": [str(tmp_path / "cond.png")]}
    ).cast_column("image", datasets.Image())
    embedded.save_to_disk(str(tmp_path / "hf_embedded"))
    (row,) = rows_of(tmp_path / "hf_embedded", tmp_path / "media")
    assert Path(row["image"]).parent == tmp_path / "media"
    assert load_image(row["image"]).shape == (3, 16, 16)

    # A CSV row with more fields than the header is rejected with its line number.
    (tmp_path / "bad.csv").write_text("video,prompt\nclips/a.mp4,x\nclips/b.mp4,y,extra\n")
    read = scan_manifest(tmp_path / "bad.csv")
    assert [r["clip_id"] for r in read.rows] == ["bad.csv:2"]
    assert read.rejects[0].reason == "invalid_row" and "bad.csv:3" in read.rejects[0].message
