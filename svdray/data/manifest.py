"""Reading the clips a user already has into rows of {"video", "image"?, "prompt"?, ...}.

Sources: a manifest as JSON Lines, CSV or Parquet (columns `video`, and optionally `image`,
`prompt`, `fps`, `motion_bucket_id`, `start_frame`; other columns are kept); a plain folder of
videos (each clip's first sampled frame conditions it); a Hugging Face `datasets` folder written
by `save_to_disk`. Relative paths resolve against the manifest's folder (for a `datasets` folder,
the folder it sits in), so a dataset folder can move as a whole.

A manifest may itself be an object in a bucket (`s3://`, `gs://`; see svdray.storage), and so may
every `video` and `image` it names: relative ones then resolve against the manifest's URI.

Reading never stops at a bad row: each one becomes a `Reject` with a reason code and a message
naming the manifest line, so a user can fix every problem in one pass.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from svdray import storage

VIDEO_EXTENSIONS = {
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".wmv",
    ".flv",
    ".ts",
    ".3gp",
}

# Reason codes for rows rejected before any file is opened.
INVALID_ROW = "invalid_row"
NO_VIDEO = "no_video"
BAD_VALUE = "bad_value"
DUPLICATE = "duplicate"
EMBEDDED_FILE = "embedded_file"


class ManifestError(ValueError):
    """A manifest that cannot be read at all, or (strict reading) the list of its bad rows."""


class DataError(ValueError):
    """No usable clip, or bad rows with data.strict: true; the message lists every one."""


@dataclass
class Reject:
    """A row that will not be trained on: which row, why (a code to group by) and how to fix it."""

    clip_id: str
    reason: str
    message: str
    row: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ManifestRead:
    rows: list[dict[str, Any]]
    rejects: list[Reject]


class RowError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _resolve(path: str, base: str | Path) -> str:
    # abspath, not resolve: a symbolic link keeps the name the user gave it (in rejects, too)
    return storage.resolve(path, base)


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def _media_path(value: Any, base: str | Path, media_dir: Path | None, column: str) -> str:
    """A path from a cell: a string, or a Hugging Face Image/Video struct {"bytes", "path"}.

    Embedded bytes are written once, content-addressed, to `media_dir` so that decord and PIL
    can read them like any file.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            if media_dir is None:
                raise RowError(EMBEDDED_FILE, f"'{column}' holds embedded bytes: run `svdray prepare` first")
            suffix = Path(path).suffix if path else (".mp4" if column == "video" else ".png")
            target = Path(media_dir) / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(target.suffix + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            return str(target)
        value = path
    if _is_missing(value):
        raise RowError(NO_VIDEO if column == "video" else BAD_VALUE, f"row has no '{column}'")
    if not isinstance(value, str):
        raise RowError(BAD_VALUE, f"'{column}' must be a path, got {type(value).__name__} {value!r}")
    try:
        storage.scheme(value.strip())
    except storage.StorageError:
        raise RowError(
            BAD_VALUE, f"'{column}' is a URL ({value}): svdray reads local files, s3:// and gs:// objects"
        ) from None
    return _resolve(value.strip(), base)


def _number(row: dict[str, Any], column: str, integer: bool, low: float, high: float) -> float | int | None:
    value = row.get(column)
    if _is_missing(value):
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and number != int(number)) or not low <= number <= high:
        kind = "an integer" if integer else "a number"
        raise RowError(BAD_VALUE, f"'{column}' must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return int(number) if integer else number


def normalize_row(raw: dict[str, Any], base: str | Path, clip_id: str, media_dir: Path | None = None) -> dict:
    """A manifest row with absolute paths and typed optional columns, or RowError."""
    row = {k: v for k, v in raw.items() if not _is_missing(v)}
    if _is_missing(raw.get("video")) and not isinstance(raw.get("video"), dict):
        raise RowError(NO_VIDEO, "row has no 'video'")
    row["video"] = _media_path(raw["video"], base, media_dir, "video")
    if "image" in row:
        row["image"] = _media_path(row["image"], base, media_dir, "image")
    for column, integer, low, high in (
        ("fps", False, 1e-3, 1000.0),
        ("motion_bucket_id", True, 0, 255),
        ("start_frame", True, 0, 1e12),
    ):
        value = _number(row, column, integer, low, high)
        if value is None:
            row.pop(column, None)
        else:
            row[column] = value
    if "prompt" in row and not isinstance(row["prompt"], str):
        row["prompt"] = str(row["prompt"])
    row["clip_id"] = clip_id
    return row


def duplicate_key(row: dict[str, Any]) -> tuple:
    """Two rows with the same key train on the same pixels (the prompt does not condition SVD)."""

    def real(path: str) -> str:
        return path if storage.is_remote(path) else os.path.realpath(path)

    image = real(row["image"]) if row.get("image") else ""
    return (real(row["video"]), image, row.get("start_frame"), row.get("fps"))


# --------------------------------------------------------------------------------------------
# The sources: each yields (clip_id, raw row or RowError, base folder)


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    # -sig: a BOM is not a bad first row
    with storage.open_text(path, encoding="utf-8-sig", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            clip_id = f"{storage.basename(path)}:{line_no}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    clip_id,
                    RowError(
                        INVALID_ROW, f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})"
                    ),
                    {"line": line.rstrip("\n")[:500]},
                )
                continue
            if not isinstance(row, dict):
                yield (
                    clip_id,
                    RowError(
                        INVALID_ROW, f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                    ),
                    {"line": line.rstrip("\n")[:500]},
                )
                continue
            yield clip_id, row, row


def _csv_rows(path: str) -> Iterator[tuple[str, Any]]:
    with storage.open_text(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f, restkey="__extra__")
        if not reader.fieldnames or "video" not in [name.strip() for name in reader.fieldnames]:
            raise ManifestError(f"{path}: the CSV header has no 'video' column (header: {reader.fieldnames})")
        for row in reader:
            clip_id = f"{storage.basename(path)}:{reader.line_num}"
            row = {(k.strip() if isinstance(k, str) else k): v for k, v in row.items()}
            if row.pop("__extra__", None) is not None:
                yield (
                    clip_id,
                    RowError(
                        INVALID_ROW, f"{path}:{reader.line_num}: more fields than the header has columns"
                    ),
                    row,
                )
                continue
            yield clip_id, row, row


def _table_rows(name: str, batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[str, Any]]:
    index = 0
    for batch in batches:
        for row in batch:
            index += 1
            yield f"{name}:row{index}", row, row


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as err:
            raise ManifestError(f"{path}: not a readable Parquet file ({err})") from err
        if "video" not in parquet.schema_arrow.names:
            raise ManifestError(f"{path}: no 'video' column (columns: {parquet.schema_arrow.names})")
        batches = (b.to_pylist() for b in parquet.iter_batches(batch_size=1024))
        yield from _table_rows(storage.basename(path), batches)


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _hf_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a `save_to_disk` folder, read as Arrow (Image/Video columns stay {bytes, path}
    structs: nothing is decoded and no pickled object is ever loaded)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ManifestError(f"{path}: not a readable Hugging Face datasets folder ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ManifestError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if "video" not in ds.column_names:
        raise ManifestError(f"{path}: no 'video' column (columns: {ds.column_names})")
    arrow = ds.with_format("arrow")
    yield from _table_rows(path.name, (arrow[i : i + 1024].to_pylist() for i in range(0, len(arrow), 1024)))


def _folder_rows(path: Path) -> Iterator[tuple[str, Any]]:
    videos = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])
    )
    for video in videos:
        rel = str(video.relative_to(path))
        yield rel, {"video": rel}, {"video": rel}


def _file_rows(path: str) -> Iterator[tuple[str, Any]]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    return _jsonl_rows(path)  # .jsonl, .json, .ndjson or anything else: JSON Lines, the default format


def _object_rows(uri: str) -> Iterator[tuple[str, Any]]:
    """A manifest in a bucket: a JSON Lines, CSV or Parquet object (not a folder of videos)."""
    try:
        kind = storage.info(uri).type
    except OSError as err:
        raise ManifestError(f"{uri}: cannot be read ({str(err).splitlines()[0]})") from err
    if kind == storage.pafs.FileType.NotFound:
        raise ManifestError(f"{uri}: not found")
    if kind == storage.pafs.FileType.Directory:
        raise ManifestError(f"{uri}: a folder in a bucket; give a JSON Lines, CSV or Parquet manifest")
    return _file_rows(uri)


def scan_manifest(path: str | Path, media_dir: str | Path | None = None) -> ManifestRead:
    """Every row of a manifest, folder of videos or `datasets` folder, and every row rejected
    before any file is opened (invalid line, no video, bad value, duplicate)."""
    media = Path(media_dir) if media_dir else None
    if storage.is_remote(path):
        path = storage.normalize(path)
        source, base = _object_rows(path), storage.parent(path)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise ManifestError(f"{path}: not found")
        if is_hf_dataset(path):
            source, base = _hf_rows(path), path.resolve().parent
        elif path.is_dir():
            source, base = _folder_rows(path), path.resolve()
        else:
            source, base = _file_rows(str(path)), path.resolve().parent

    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    seen: dict[tuple, str] = {}
    for clip_id, raw, original in source:
        try:
            if isinstance(raw, RowError):
                raise raw
            row = normalize_row(raw, base, clip_id, media)
        except RowError as err:
            message = str(err) if str(err).startswith(str(path)) else f"{clip_id}: {err}"
            rejects.append(Reject(clip_id, err.reason, message, _jsonable(original)))
            continue
        key = duplicate_key(row)
        if key in seen:
            rejects.append(
                Reject(clip_id, DUPLICATE, f"{clip_id}: same clip as {seen[key]}", _jsonable(original))
            )
            continue
        seen[key] = clip_id
        rows.append(row)
    if not rows and not rejects:
        folder = isinstance(path, Path) and path.is_dir()
        raise ManifestError(f"{path}: no rows" + (" (no video files found)" if folder else ""))
    return ManifestRead(rows, rejects)


def _jsonable(row: Any) -> dict[str, Any]:
    """A row as it can be written to rejects.jsonl (embedded bytes are summarised)."""
    if not isinstance(row, dict):
        return {"value": repr(row)[:500]}
    out = {}
    for key, value in row.items():
        if isinstance(value, dict) and "bytes" in value:
            value = {"path": value.get("path"), "bytes": f"<{len(value['bytes'] or b'')} bytes>"}
        out[str(key)] = value if isinstance(value, (str, int, float, bool, type(None), dict)) else repr(value)
    return out


def read_manifest(path: str | Path, media_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows with absolute `video` (and `image` when given) paths, plus a stable `clip_id`; raises
    ManifestError listing every bad row if there is any.

    `clip_id` names the row in its manifest (file:line, file:rowN, or the path in a folder): it
    identifies the clip through decoding, sharding and caching, and seeds its per-epoch random
    choices so that every run sees the same frames.
    """
    read = scan_manifest(path, media_dir)
    if read.rejects:
        raise ManifestError(
            f"{path}: {len(read.rejects)} bad row(s):\n" + "\n".join(f"  {r.message}" for r in read.rejects)
        )
    return read.rows


def write_manifest(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    return path
