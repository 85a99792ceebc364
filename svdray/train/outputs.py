"""What a run keeps next to its checkpoints when `train.storage_path` is a bucket.

On a cluster whose nodes share no disk, the bucket is the only place every node and the driver
see: rank 0 uploads the final LoRA there (into `<storage_path>/<name>/lora/`, beside the
`step_N/` checkpoints) instead of writing it into `output_dir` on its own node, the driver
uploads the run's `config.yaml` beside it, and the driver downloads the LoRA into its
`output_dir/lora`. So `<storage_path>/<name>` reads like an output_dir: `svdray export --run`
and `svdray sample --lora` take its URI. With a local storage path nothing changes: rank 0
writes `output_dir/lora` itself.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from svdray import storage
from svdray.config import Config
from svdray.models.base import ModelFamily


def run_folder(cfg: Config) -> str:
    """The run's folder in its storage path: Ray Train's checkpoints, and what this module keeps."""
    return storage.join(cfg.train.storage_path, cfg.train.name)


def in_bucket(cfg: Config) -> bool:
    return storage.is_remote(cfg.train.storage_path)


def publish_config(cfg: Config, config_file: Path) -> None:
    """The run's resolved config beside its checkpoints (the driver calls this at the start)."""
    if in_bucket(cfg):
        storage.write_bytes(storage.join(run_folder(cfg), "config.yaml"), config_file.read_bytes())


def save_final_lora(family: ModelFamily, denoiser: torch.nn.Module, cfg: Config) -> None:
    """Rank 0's last act: the final LoRA as the family saves it, into output_dir/lora, or (storage
    in a bucket) uploaded into the run's folder, never touching this node's disk beyond a
    temporary folder."""
    if not in_bucket(cfg):
        family.save_lora(denoiser, cfg, Path(cfg.output_dir) / "lora")
        return
    with tempfile.TemporaryDirectory(prefix="svdray-lora-") as tmp:
        family.save_lora(denoiser, cfg, Path(tmp) / "lora")
        storage.upload(Path(tmp) / "lora", storage.join(run_folder(cfg), "lora"))


def fetch_final_lora(cfg: Config) -> Path:
    """output_dir/lora on the driver: downloaded from the run's folder when storage is a bucket."""
    local = Path(cfg.output_dir) / "lora"
    if in_bucket(cfg):
        shutil.rmtree(local, ignore_errors=True)
        storage.download(storage.join(run_folder(cfg), "lora"), local)
    return local
