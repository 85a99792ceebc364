"""Each worker's own record of the run (`train.save_worker_loras`, a debug aid): its final LoRA,
to check that DDP kept the replicas identical, and the Ray node it ran on, to check where
`train.placement` put it."""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch

from svdray.models.lora import save_lora

NODE_FILE = "node.json"


def save_worker_record(denoiser: torch.nn.Module, folder: str | Path, rank: int) -> Path:
    """This rank's LoRA and node.json ({"rank", "node_id"}) in `folder` (the run's
    workers/rank<N>: svdray.train.outputs.run_output)."""
    folder = Path(folder)
    save_lora(denoiser, folder)
    node = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}
    (folder / NODE_FILE).write_text(json.dumps(node))
    return folder
