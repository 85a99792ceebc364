"""What the Ray job entrypoints in jobs/ run: a check of where the job runs, then the CLI command.

`ray job submit --working-dir . -- python jobs/train.py ...` runs in a temporary copy of the
submitted folder, which Ray deletes later. So a job's outputs, Ray storage, MLflow store and
inputs must be given as absolute paths (or URIs), on storage every node of the cluster can
reach; a relative path is refused here, naming the key, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svdray.config import Config

# Only the standard library above: this module must be able to say what is missing.
_REQUIRED = ("torch", "ray", "diffusers", "peft", "mlflow", "decord", "yaml")


def check_environment() -> str | None:
    """A message when this Python lacks svdray's dependencies (a job started outside the venv)."""
    import importlib.util

    missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"{sys.executable} has no {', '.join(missing)}: the job's `python` is the one on the PATH of "
        "the process that ran `ray start`. Start the Ray head from the project's venv "
        "(`source .venv/bin/activate && ray start --head ...`), or submit with the venv's python "
        "by absolute path (`-- /path/to/.venv/bin/python jobs/train.py ...`)."
    )


def relative_paths(cfg: Config) -> dict[str, str]:
    """Config keys holding relative paths, which a job would resolve inside its temporary copy."""
    paths = {
        "output_dir": cfg.output_dir,
        "train.storage_path": cfg.train.storage_path,
        "data.manifest": cfg.data.manifest,
    }
    if cfg.sample.image:
        paths["sample.image"] = cfg.sample.image
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the environment's URI wins over the config's
        paths["mlflow.tracking_uri"] = cfg.mlflow.tracking_uri
    if cfg.model.pretrained.startswith("."):  # "org/name" is a hub id, not a relative folder
        paths["model.pretrained"] = cfg.model.pretrained
    return {key: value for key, value in paths.items() if value and not _is_absolute(value)}


def _is_absolute(value: str) -> bool:
    if value.startswith("sqlite:///"):
        return value.startswith("sqlite:////")
    return "://" in value or Path(value).expanduser().is_absolute()


def _refuse_relative(relative: dict[str, str]) -> int:
    for key, value in relative.items():
        print(
            f"config error: {key}: {value!r} is relative; a Ray job runs in a temporary copy of the "
            f"working dir, so give an absolute path, e.g. --set {key}=$PWD/...",
            file=sys.stderr,
        )
    return 2


def run_job(command: str, argv: list[str]) -> int:
    """`svdray <command> <argv>` as a Ray job: refuse a foreign Python and relative paths first."""
    problem = check_environment()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from svdray.cli import build_parser, main
    from svdray.config import ConfigError, load_config

    args = build_parser().parse_args([command, *argv])
    try:
        # Files are checked by the command itself; a relative path explains a missing one first.
        cfg = load_config(args.config, args.set, check_files=False)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    relative = relative_paths(cfg)
    if relative:
        return _refuse_relative(relative)
    return main([command, *argv])


def run_prepare_job(argv: list[str]) -> int:
    """`jobs/prepare.py --manifest PATH --out DIR`: probe and clean a manifest once, as a job."""
    problem = check_environment()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="jobs/prepare.py", description=run_prepare_job.__doc__)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    args, rest = parser.parse_known_args(argv)  # the rest: `svdray prepare` options (--config, --fps, ...)
    relative = {
        k: v for k, v in {"--manifest": args.manifest, "--out": args.out}.items() if not _is_absolute(v)
    }
    if relative:
        return _refuse_relative(relative)
    from svdray.cli import main

    return main(["prepare", "--manifest", args.manifest, "--out", args.out, *rest])
