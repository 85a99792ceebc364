"""`svdray sample`'s settings and writing sampled videos: H.264 mp4s and frame grids (sampling
itself is the model family's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from svdray.config import Config, ConfigError, ModelConfig, build_section, config_from_dict, set_key
from svdray.models import registered_families


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """H.264 mp4 (yuv420p, playable everywhere) from (T, H, W, 3) uint8 frames."""
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        output_params=["-crf", "18"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def write_preview(frames: np.ndarray, path: str | Path, columns: int = 8, scale: int = 1) -> Path:
    """All frames tiled into one PNG: easier to judge at a glance than a tiny video."""
    count, height, width = frames.shape[:3]
    rows = -(-count // columns)
    grid = np.zeros((rows * height, min(count, columns) * width, 3), np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = frame
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    image.save(path)
    return path


# `svdray sample` flag -> the config key it sets: these, and each family's own
# (`FamilyConfig.sample_flags`). Unset flags keep the value of the LoRA's own training run (its
# config.yaml next to the LoRA), so a sample is conditioned as training was.
SHARED_SAMPLE_FLAGS = {
    "family": "model.family",
    "pipeline": "model.pretrained",
    "variant": "model.variant",
    "revision": "model.revision",
    "dtype": "model.frozen_dtype",
    "mixed_precision": "train.mixed_precision",
    "num_frames": "sample.num_frames",
    "height": "data.height",
    "width": "data.width",
    "steps": "sample.steps",
    "fps": "sample.fps",
    "seed": "sample.seed",
}
SAMPLE_FLAGS = SHARED_SAMPLE_FLAGS | {
    flag: option.key for spec in registered_families() for flag, option in spec.sample_flags.items()
}


def check_pipeline(pretrained: str) -> None:
    """`--pipeline` (or the run's model.pretrained): a local folder must exist and hold no pickles."""
    from svdray.safeload import check_pipeline_folder

    if Path(pretrained).exists():
        check_pipeline_folder(pretrained, "--pipeline")
    elif pretrained.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--pipeline: {pretrained} does not exist")


def check_sample_size(height: int, width: int, multiple: int, family: str) -> None:
    """The size `svdray sample` samples at (its flags, the run's, or the image's rounded down)
    against the family's rule (`ModelFamily.side_multiple`), naming the flag, before a model loads."""
    for flag, side in (("--height", height), ("--width", width)):
        if side <= 0 or side % multiple:
            raise ConfigError(
                f"{flag}: {side} is not a positive multiple of {multiple}, as model.family {family} "
                "needs for this pipeline"
            )


def sampling_config(
    lora_dir: str | None, flags: dict[str, Any], image_size: tuple[int, int]
) -> tuple[Config, bool]:
    """The config `svdray sample` samples with, and whether it came from the LoRA's training run:
    that run's config where one lies next to the LoRA, with the given flags (None: unset) on top.
    Without a run, the pipeline's own frame count and the image's size (`image_size`, (H, W))
    rounded down to the family's multiple, both read from the pipeline's configs (no weights load).
    The size is checked against the family's rule; a bad value is a ConfigError naming the flag."""
    from svdray.export import run_config
    from svdray.models import get_family

    tree = (run_config(lora_dir) if lora_dir else None) or {}
    from_run = bool(tree)
    tree.pop("tune", None)  # a run's sweep section is no concern of sampling
    # Without a run, the frames sampled are the run-less config's data.num_frames.
    keys = SAMPLE_FLAGS if from_run else {**SAMPLE_FLAGS, "num_frames": "data.num_frames"}
    for flag, value in flags.items():
        if value is not None:
            set_key(tree, keys[flag], value)
    if not tree.get("model", {}).get("pretrained"):
        raise ConfigError("--pipeline: required when no training run config lies next to --lora")
    check_pipeline(tree["model"]["pretrained"])
    try:
        model = build_section(ModelConfig, tree["model"], "model")
        family = get_family(model.family)
        multiple = family.side_multiple(model)
        if not from_run:
            defaults = {
                "num_frames": ("data.num_frames", family.default_num_frames(model)),
                "height": ("data.height", image_size[0] // multiple * multiple),
                "width": ("data.width", image_size[1] // multiple * multiple),
            }
            for flag, (key, value) in defaults.items():
                if flags.get(flag) is None:
                    set_key(tree, key, value)
        cfg = config_from_dict(tree, check_files=False)
    except ConfigError as err:
        for flag, key in keys.items():
            if str(err).startswith(f"{key}:"):
                raise ConfigError(f"--{flag.replace('_', '-')}: {str(err)[len(key) + 2 :]}") from None
        raise
    check_sample_size(cfg.data.height, cfg.data.width, multiple, family.name)
    return cfg, from_run
