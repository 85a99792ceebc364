"""`svdray prepare`: probe every row of a manifest once, keep the good ones, explain the rest.

Every row is opened in parallel with Ray Data (decord for the video: frame count, fps, size,
duration, first and last frame decoded; PIL for the image). The folder written:

    clean.jsonl     the accepted rows, with the probed facts (training reads these, no re-probing)
    rejects.jsonl   one line per rejected row: the row, a reason code and a message
    prepare.json    the settings the rows were checked against, and the counts

Training accepts such a folder as `data.manifest`; given a raw manifest instead, it prepares it
into `<output_dir>/data` first. By default bad rows are rejected and training goes on with the
rest; `data.strict: true` stops before training, listing every bad row.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from svdray import storage
from svdray.config import DataConfig
from svdray.data.dataset import map_with_bounded_retries
from svdray.data.manifest import DataError, ManifestError, Reject, scan_manifest, write_manifest
from svdray.data.video import TOO_SHORT, ClipError, probe_image, probe_video
from svdray.progress import collect_rows

logger = logging.getLogger(__name__)

CLEAN = "clean.jsonl"
REJECTS = "rejects.jsonl"
INFO = "prepare.json"


PROBE_FAILED = "probe_failed"
DECODER_CRASHED = "decoder_crashed"


@dataclass
class Prepared:
    rows: list[dict[str, Any]]
    rejects: list[Reject]
    source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejects))


def check_window(row: dict[str, Any], num_frames: int, fps: float) -> None:
    """ClipError(too_short) if the clip (from its start_frame, if set) holds fewer than
    `num_frames` frames at `fps`, judged from its probed frame times (no file is opened)."""
    fps = row.get("fps") or fps
    left = row["last_frame_time"] - row.get("start_time", row["first_frame_time"])
    span = (num_frames - 1) / fps
    if left < span - 1e-6:
        after = f" after start_frame {row['start_frame']}" if "start_frame" in row else ""
        raise ClipError(
            f"{row['video']}: too short{after}: its frames span {left:.2f}s, {num_frames} frames at "
            f"{fps:g} fps span {span:.2f}s",
            TOO_SHORT,
        )


def probe_row(row: dict[str, Any], num_frames: int, fps: float) -> dict[str, Any]:
    """The row with its probed facts, or ClipError naming the file and the reason."""
    facts = probe_video(row["video"], row.get("start_frame"))
    # The manifest's own `fps` (the rate to sample this clip at) stays; the container's is fps_source.
    probed = {**row, **{k: v for k, v in facts.items() if k != "fps"}, "fps_source": facts["fps"]}
    check_window(probed, num_frames, fps)
    if row.get("image"):
        probed.update(probe_image(row["image"]))
    return probed


def probe_batch(batch: dict[str, np.ndarray], num_frames: int, fps: float) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: rows travel as JSON (their columns vary from row to row)."""
    results = []
    for text in batch["row"]:
        row = json.loads(text)
        try:
            results.append(json.dumps({"row": probe_row(row, num_frames, fps)}))
        except ClipError as err:
            reject = Reject(row["clip_id"], err.reason, str(err), row)
            results.append(json.dumps({"reject": reject.to_dict()}))
        except Exception as err:  # a file that breaks the prober in a way nobody foresaw
            reject = Reject(row["clip_id"], PROBE_FAILED, f"{row['video']}: {type(err).__name__}: {err}", row)
            results.append(json.dumps({"reject": reject.to_dict()}))
    return {"result": np.array(results, dtype=object)}


def _probe_pass(rows: list[dict[str, Any]], num_frames: int, fps: float, cpus: float, per_task: int) -> list:
    ds = map_with_bounded_retries(
        ray.data.from_items(
            [{"row": json.dumps(r, default=str)} for r in rows],
            override_num_blocks=max(1, min(len(rows) // per_task, 1000)),
        ),
        probe_batch,
        batch_size=per_task,
        num_cpus=cpus,
        fn_kwargs=dict(num_frames=num_frames, fps=fps),
    )
    # A decoder that crashes its worker process (it happens on some corrupt files) costs the rows
    # of that task, which are probed again one by one, instead of the whole run.
    ds.context.max_errored_blocks = -1
    return [json.loads(r["result"]) for r in collect_rows(ds, "prepare", len(rows), "clips")]


def probe_rows(
    rows: list[dict[str, Any]], num_frames: int, fps: float, cpus: float = 1.0
) -> tuple[list[dict[str, Any]], list[Reject]]:
    """Probe rows in parallel Ray tasks; results come back in manifest order."""
    if not rows:
        return [], []
    results = _probe_pass(rows, num_frames, fps, cpus, per_task=8)
    done = {r["row"]["clip_id"] if "row" in r else r["reject"]["clip_id"] for r in results}
    lost = [r for r in rows if r["clip_id"] not in done]
    if lost:
        logger.warning("probing %d row(s) again one by one after a crashed decoder", len(lost))
        results += _probe_pass(lost, num_frames, fps, cpus, per_task=1)
        done |= {r["row"]["clip_id"] if "row" in r else r["reject"]["clip_id"] for r in results}
    order = {r["clip_id"]: i for i, r in enumerate(rows)}
    accepted = sorted((r["row"] for r in results if "row" in r), key=lambda r: order[r["clip_id"]])
    rejects = [Reject(**r["reject"]) for r in results if "reject" in r]
    for row in rows:
        if row["clip_id"] not in done:
            message = f"{row['video']}: the video decoder crashed on this file"
            rejects.append(Reject(row["clip_id"], DECODER_CRASHED, message, row))
    rejects.sort(key=lambda r: order[r.clip_id])
    return accepted, rejects


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(prepared.rows, out / CLEAN)
    write_manifest([r.to_dict() for r in prepared.rejects], out / REJECTS)
    info = {
        "source": prepared.source,
        "settings": prepared.settings,
        "accepted": len(prepared.rows),
        "rejected": len(prepared.rejects),
        "rejected_by_reason": prepared.reject_counts(),
    }
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def prepare(
    manifest: str | Path, out_dir: str | Path, num_frames: int, fps: float, cpus: float = 1.0
) -> Prepared:
    """Read and probe every row of `manifest`; write clean.jsonl, rejects.jsonl, prepare.json."""
    out = Path(out_dir)
    read = scan_manifest(manifest, media_dir=out / "media")
    accepted, rejects = probe_rows(read.rows, num_frames, fps, cpus)
    all_rejects = sorted(read.rejects + rejects, key=lambda r: _line_order(r.clip_id))
    source = storage.normalize(manifest) if storage.is_remote(manifest) else str(Path(manifest).resolve())
    prepared = Prepared(accepted, all_rejects, source, {"num_frames": num_frames, "fps": fps})
    write_prepared(prepared, out)
    return prepared


def _line_order(clip_id: str) -> tuple:
    """Sort key putting rejects in manifest order (line / row numbers compare as numbers)."""
    tail = clip_id.rsplit(":", 1)[-1].removeprefix("row")
    return (0, int(tail), "") if tail.isdigit() else (1, 0, clip_id)


def is_prepared(path: str | Path) -> bool:
    if storage.is_remote(path):  # a bucket holds manifests; a prepared folder is the run's own
        return False
    path = Path(path)
    return path.is_dir() and (path / INFO).exists() and (path / CLEAN).exists()


def load_prepared(path: str | Path) -> Prepared:
    """A folder written by `prepare`: its rows are used as they are, without opening any file."""
    path = Path(path)
    if not is_prepared(path):
        raise ManifestError(f"{path}: not a `svdray prepare` folder (no {INFO} and {CLEAN})")
    info = json.loads((path / INFO).read_text())
    rows = [json.loads(line) for line in (path / CLEAN).read_text().splitlines() if line.strip()]
    rejects = []
    if (path / REJECTS).exists():
        rejects = [Reject(**json.loads(line)) for line in (path / REJECTS).read_text().splitlines() if line]
    return Prepared(rows, rejects, info.get("source", str(path)), info.get("settings", {}))


def recheck(prepared: Prepared, num_frames: int, fps: float) -> Prepared:
    """Reject the rows too short for these settings (a folder prepared for fewer frames or a
    higher fps), from the probed facts alone."""
    if prepared.settings == {"num_frames": num_frames, "fps": fps}:
        return prepared
    rows, rejects = [], list(prepared.rejects)
    for row in prepared.rows:
        try:
            check_window(row, num_frames, fps)
            rows.append(row)
        except ClipError as err:
            rejects.append(Reject(row["clip_id"], err.reason, str(err), row))
    return Prepared(rows, rejects, prepared.source, {"num_frames": num_frames, "fps": fps})


def training_rows(cfg: DataConfig, work_dir: str | Path) -> Prepared:
    """The rows a run trains on: from a prepared folder as is, or from any other source prepared
    into `work_dir` now. With data.strict, any rejected row stops here (DataError lists all)."""
    if is_prepared(cfg.manifest):
        prepared = recheck(load_prepared(cfg.manifest), cfg.num_frames, cfg.fps)
    else:
        prepared = prepare(cfg.manifest, work_dir, cfg.num_frames, cfg.fps, cfg.decode_cpus)
    logger.info("%s", summary_table(prepared))
    if cfg.strict and prepared.rejects:
        raise DataError(
            f"data.strict: {len(prepared.rejects)} bad row(s) in {cfg.manifest}:\n"
            + "\n".join(f"  {r.clip_id} [{r.reason}] {r.message}" for r in prepared.rejects)
        )
    if not prepared.rows:
        raise DataError(
            f"{cfg.manifest}: no usable clips ({len(prepared.rejects)} rejected: {prepared.reject_counts()})"
        )
    return prepared


def _histogram(values: list[float], edges: list[float], unit: str) -> str:
    counts = []
    for low, high in zip([0.0, *edges], [*edges, float("inf")], strict=True):
        n = sum(low <= v < high for v in values)
        if n:
            if low == 0:
                label = f"<{high:g}{unit}"
            elif high == float("inf"):
                label = f">={low:g}{unit}"
            else:
                label = f"{low:g}-{high:g}{unit}"
            counts.append(f"{label}: {n}")
    return ", ".join(counts)


def summary_table(prepared: Prepared) -> str:
    """What a user reads after `svdray prepare`: counts, reasons, resolutions, durations."""
    rows, rejects = prepared.rows, prepared.rejects
    lines = [
        f"{'rows':<22}{len(rows) + len(rejects)}",
        f"{'accepted':<22}{len(rows)}",
        f"{'rejected':<22}{len(rejects)}",
    ]
    for reason, count in sorted(prepared.reject_counts().items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<20}{count}")
    if rows:
        sizes = Counter(f"{r['width']}x{r['height']}" for r in rows)
        top = ", ".join(f"{size}: {n}" for size, n in sizes.most_common(6))
        more = f" (+{len(sizes) - 6} more)" if len(sizes) > 6 else ""
        lines.append(f"{'resolutions (WxH)':<22}{top}{more}")
        shapes = Counter(
            "portrait" if r["height"] > r["width"] else "square" if r["height"] == r["width"] else "landscape"
            for r in rows
        )
        lines.append(f"{'orientation':<22}" + ", ".join(f"{k}: {v}" for k, v in sorted(shapes.items())))
        durations = [r["duration"] for r in rows]
        lines.append(
            f"{'duration (s)':<22}min {min(durations):.2f}, median {statistics.median(durations):.2f}, "
            f"max {max(durations):.2f}, total {sum(durations) / 3600:.2f} h"
        )
        lines.append(f"{'':<22}{_histogram(durations, [2, 5, 10, 30, 120], 's')}")
        rates = Counter(f"{r['fps_source']:.3g}" for r in rows)
        vfr = sum(r.get("vfr", False) for r in rows)
        lines.append(
            f"{'source fps':<22}"
            + ", ".join(f"{k}: {v}" for k, v in rates.most_common(6))
            + (f" (variable frame rate: {vfr})" if vfr else "")
        )
        images = Counter(r["image_mode"] for r in rows if r.get("image_mode"))
        if images:
            lines.append(f"{'images (mode)':<22}" + ", ".join(f"{k}: {v}" for k, v in images.most_common()))
    return "\n".join(lines)
