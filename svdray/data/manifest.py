"""Reading the clip manifest: JSON Lines rows of {"image"?, "video", "prompt"?}.

Relative paths resolve against the manifest's folder, so a dataset folder can move as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ManifestError(ValueError):
    """A manifest that cannot be read, naming the file and line."""


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows with absolute `video` (and `image` when given) paths, plus a stable `clip_id`.

    `clip_id` is the row's line number: it identifies the clip through decoding, sharding and
    caching, and seeds its per-epoch random choices so that every run sees the same frames.
    """
    path = Path(path)
    base = path.resolve().parent
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            if not row.get("video"):
                raise ManifestError(f"{path}:{line_no}: row has no 'video'")
            row["video"] = _resolve(row["video"], base)
            if row.get("image"):
                row["image"] = _resolve(row["image"], base)
            row["clip_id"] = f"{path.name}:{line_no}"
            rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def write_manifest(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
