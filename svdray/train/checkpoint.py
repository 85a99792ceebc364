"""Full training state as safetensors + JSON: nothing in a checkpoint is ever unpickled.

A checkpoint folder holds:
    lora/                     the adapter in peft's format (usable on its own)
    optimizer.safetensors     every optimizer state tensor, keyed "<param index>.<name>"
    rng.safetensors           each worker's torch RNG and noise-generator state, keyed by rank
    state.json                step, samples consumed, optimizer param groups, LR scheduler state
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from svdray.config import LoraConfig
from svdray.model.lora import ADAPTER_WEIGHTS, save_lora

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


@dataclass
class TrainState:
    step: int = 0  # optimizer updates done
    samples_seen: int = 0  # examples consumed by all workers together (the data position)
    bad_steps: int = 0  # updates skipped for a non-finite loss or gradient, in total


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
    unet: torch.nn.Module,
    lora_cfg: LoraConfig,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    rng_states: dict[str, torch.Tensor],
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_lora(unet, lora_cfg, directory / "lora")
    tensors, optimizer_meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    save_file({k: v.contiguous() for k, v in rng_states.items()}, str(directory / RNG_FILE))
    scheduler_state = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    payload = {"train": asdict(state), "optimizer": optimizer_meta, "lr_scheduler": scheduler_state}
    (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))
    return directory


def read_train_state(directory: str | Path) -> TrainState:
    payload = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainState(**payload["train"])


def load_checkpoint(
    directory: str | Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore LoRA weights, optimizer and scheduler in place; returns the state and RNG states."""
    import peft

    directory = Path(directory)
    payload = json.loads((directory / STATE_FILE).read_text())
    peft.set_peft_model_state_dict(unet, load_file(str(directory / "lora" / ADAPTER_WEIGHTS)))
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    optimizer.load_state_dict(_optimizer_from_files(tensors, payload["optimizer"]))
    lr_scheduler.load_state_dict(
        {**payload["lr_scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    return TrainState(**payload["train"]), load_file(str(directory / RNG_FILE))
