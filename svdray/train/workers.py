"""Each worker's own record of the run (`train.save_worker_loras`, a debug aid): its final LoRA,
to check that DDP kept the replicas identical (under FSDP2, the LoRA as this worker gathered it
from its shard group), the Ray node it ran on, to check where `train.placement` put it, and the
device mesh the model was sharded on (`train.parallel: fsdp | hsdp`)."""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch

from svdray.models.lora import save_lora

NODE_FILE = "node.json"


def save_worker_record(
    denoiser: torch.nn.Module,
    folder: str | Path,
    rank: int,
    state_dict: dict[str, torch.Tensor] | None = None,
    mesh: list | None = None,
) -> Path:
    """This rank's LoRA (`state_dict`: as this rank gathered it from a sharded model) and
    node.json ({"rank", "node_id", "mesh": ranks by mesh position or null}) in `folder` (the
    run's workers/rank<N>: svdray.train.outputs.run_output)."""
    folder = Path(folder)
    save_lora(denoiser, folder, state_dict=state_dict)
    node = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "mesh": mesh}
    (folder / NODE_FILE).write_text(json.dumps(node))
    return folder
