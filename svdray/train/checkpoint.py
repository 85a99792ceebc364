"""Full training state as safetensors + JSON (+ torch.distributed.checkpoint shards for a
sharded run): no weight is ever unpickled.

A checkpoint folder holds:
    lora/                     the adapter in peft's format (usable on its own), the whole LoRA
                              gathered from the workers
    optimizer.safetensors     (ddp) every optimizer state tensor, keyed "<param index>.<name>"
    sharded/                  (fsdp, hsdp) each worker's shards of the LoRA and of the optimizer
                              state, written by every worker with `torch.distributed.checkpoint`
                              (keys `lora/<param>`, `optimizer/<param>/<state>`; tensors only),
                              which reads them back at any worker count
    rng.safetensors           each worker's torch RNG and noise-generator state, keyed by rank
    state.json                step, samples consumed, skipped updates, optimizer param groups,
                              LR scheduler state, and the run's config

A sharded checkpoint's metadata file (`sharded/.metadata`) is a pickle of torch's own; it is read
only after `svdray.safeload.check_sharded_state` found nothing in it but torch's checkpoint
metadata classes and tensor entries.

That is everything a resumed run needs to compute exactly what the uninterrupted run would have:
- The data position is `samples_seen`: the driver plans the whole stream of examples up front
  (a seeded permutation per epoch, each example's frames fixed by its own seed), so the number of
  examples consumed also fixes the epoch (the planned stream is whole epochs of the manifest) and
  the position inside it; a resumed run starts the stream right after them.
- There is no gradient scaler to save: mixed precision is bf16 autocast only, whose exponent range
  equals float32's, so no loss scaling is needed (fp16, which would need one, is not offered).
- Each worker's RNG states (global torch, CUDA, and the generator that draws sigmas, noise,
  augmentation and dropout) are gathered to rank 0 and restored per rank.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from svdray.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora_weights, save_lora
from svdray.safeload import check_folder, check_safetensors, check_sharded_state

if TYPE_CHECKING:
    from svdray.train.parallel import Parallel

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SHARDED_DIR = "sharded"


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    samples_seen: int = 0  # examples consumed by all workers together (the data position)
    bad_steps: int = 0  # updates skipped for a non-finite loss or gradient, in total
    # Workers of the attempt that wrote the checkpoint (an elastic run's count changes; the global
    # batch does not); 0 in checkpoints written before this was recorded.
    world_size: int = 0


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    rng_states: dict[str, torch.Tensor],
    config: dict[str, Any] | None = None,
    lora_state: dict[str, torch.Tensor] | None = None,
    sharded: tuple[dict[str, torch.Tensor], list[dict]] | None = None,
    rank: int = 0,
) -> Path:
    """Write the checkpoint into `directory`. `lora_state`: the LoRA gathered from the workers
    (`Parallel.lora_state_dict`; None reads it from `denoiser`). `sharded`: this worker's
    shards and the optimizer's param groups (`Parallel.sharded_state`); every worker then calls
    this and writes its shards into sharded/ (collectively), and rank 0 the rest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        tensors, param_groups = sharded
        # overwrite: the workers of one machine may share the folder (said, to keep torch quiet).
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(directory / SHARDED_DIR), overwrite=True))
        optimizer_meta: dict[str, Any] = {"param_groups": param_groups, "sharded": True}
        if rank != 0:
            return directory
    else:
        tensors, optimizer_meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(directory / OPTIMIZER_FILE))
    base_model = (config or {}).get("model", {}).get("pretrained")
    save_lora(denoiser, directory / "lora", base_model, lora_state)
    save_file({k: v.contiguous() for k, v in rng_states.items()}, str(directory / RNG_FILE))
    scheduler_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    payload = {
        "train": asdict(state),
        "optimizer": optimizer_meta,
        "lr_scheduler": scheduler_state,
        "config": config,
    }
    (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))
    return directory


def check_checkpoint(directory: str | Path) -> Path:
    """`directory` if it is an svdray checkpoint folder; a clear error (and never an unpickling)
    for anything else, e.g. a `.pt`/`.ckpt` file or a folder of another trainer's pickles."""
    directory = check_folder(directory, "checkpoint")
    if not (directory / STATE_FILE).is_file():
        steps = sorted(p.name for p in directory.glob("step_*") if (p / STATE_FILE).is_file())
        hint = f" (it holds the checkpoints {', '.join(steps)}: pass one of them)" if steps else ""
        raise FileNotFoundError(
            f"checkpoint: {directory} is not an svdray checkpoint folder: no {STATE_FILE}{hint}"
        )
    if (directory / SHARDED_DIR).is_dir():
        check_sharded_state(directory / SHARDED_DIR, "checkpoint")
    else:
        check_safetensors(directory / OPTIMIZER_FILE, "checkpoint")
    for name in (RNG_FILE, f"lora/{ADAPTER_WEIGHTS}"):
        check_safetensors(directory / name, "checkpoint")
    if not (directory / "lora" / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"checkpoint: {directory / 'lora' / ADAPTER_CONFIG} is missing")
    return directory


def read_checkpoint_payload(directory: str | Path) -> dict[str, Any]:
    return json.loads((check_checkpoint(directory) / STATE_FILE).read_text())


def read_train_state(directory: str | Path) -> TrainState:
    return TrainState(**read_checkpoint_payload(directory)["train"])


def load_checkpoint(
    directory: str | Path,
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore LoRA weights, optimizer and scheduler in place (every worker calls it); returns
    the state and RNG states. A sharded checkpoint restores into any `train.parallel` and worker
    count; a DDP one into DDP only (the optimizer state is stored by parameter index)."""
    directory = check_checkpoint(directory)
    payload = json.loads((directory / STATE_FILE).read_text())
    if payload["optimizer"].get("sharded"):
        parallel.load_sharded_state(directory / SHARDED_DIR, optimizer, payload["optimizer"]["param_groups"])
    elif parallel.sharded:
        raise ValueError(
            f"checkpoint: {directory} was written by a train.parallel: ddp run; this run "
            f"(train.parallel: {parallel.strategy}) resumes from fsdp/hsdp checkpoints only"
        )
    else:
        load_lora_weights(parallel.denoiser, directory / "lora")
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(_optimizer_from_files(tensors, payload["optimizer"]))
    lr_scheduler.load_state_dict(
        {**payload["lr_scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    return TrainState(**payload["train"]), load_file(str(directory / RNG_FILE))
