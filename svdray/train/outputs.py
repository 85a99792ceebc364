"""Where a run's outputs written by its workers go: `output_dir`, or, when `train.storage_path`
is a bucket, the run's folder there.

On a cluster whose nodes share no disk, the bucket is the only place every node and the driver
see. So with storage in a bucket the workers write nothing into `output_dir` on their own
nodes: rank 0 uploads the final LoRA into `<storage_path>/<name>/lora/` (beside the `step_N/`
checkpoints; `train.save_worker_loras` records go to `workers/rank<N>/` there), the driver
uploads the run's `config.yaml` beside it and downloads the LoRA into its own
`output_dir/lora`. `<storage_path>/<name>` then reads like an output_dir: `svdray export --run`
and `svdray sample --lora` take its URI. With a local storage path the workers write into
`output_dir` as before.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from svdray import storage
from svdray.config import Config
from svdray.models.base import ModelFamily


def run_folder(cfg: Config) -> str:
    """The run's folder in its storage path: Ray Train's checkpoints, and the outputs kept there."""
    return storage.join(cfg.train.storage_path, cfg.train.name)


def in_bucket(cfg: Config) -> bool:
    return storage.is_remote(cfg.train.storage_path)


@contextlib.contextmanager
def run_output(cfg: Config, relative: str) -> Iterator[Path]:
    """A folder to write one of the run's outputs into: output_dir/<relative>, or (storage in a
    bucket) a temporary folder, uploaded to <run folder>/<relative> once written."""
    if not in_bucket(cfg):
        yield Path(cfg.output_dir) / relative
        return
    with tempfile.TemporaryDirectory(prefix="svdray-output-") as tmp:
        yield Path(tmp)
        storage.upload(tmp, storage.join(run_folder(cfg), relative))


def publish_config(cfg: Config, config_file: Path) -> None:
    """The run's resolved config beside its checkpoints (the driver calls this at the start)."""
    if in_bucket(cfg):
        storage.write_bytes(storage.join(run_folder(cfg), "config.yaml"), config_file.read_bytes())


def save_final_lora(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    cfg: Config,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Rank 0's last act: the final LoRA as the family saves it (`run_output` "lora");
    `state_dict`: the LoRA gathered from a sharded model (svdray.train.parallel)."""
    with run_output(cfg, "lora") as folder:
        family.save_lora(denoiser, cfg, folder, state_dict)


def fetch_final_lora(cfg: Config) -> Path:
    """output_dir/lora on the driver: downloaded from the run's folder when storage is a bucket."""
    local = Path(cfg.output_dir) / "lora"
    if in_bucket(cfg):
        shutil.rmtree(local, ignore_errors=True)
        storage.download(storage.join(run_folder(cfg), "lora"), local)
    return local
