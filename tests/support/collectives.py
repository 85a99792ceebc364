"""Code that runs in processes a test spawns: kept apart from the test modules so that each child
imports torch and nothing else (a spawned child imports the module its target lives in)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def collective_after_peer_died(rank: int, port: int, errors) -> None:
    """Two gloo ranks all-reduce once; then rank 1 exits and rank 0's next all-reduce fails."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tensor = torch.ones(4)
    dist.all_reduce(tensor)
    if rank == 1:
        os._exit(0)
    try:
        dist.all_reduce(tensor)
    except RuntimeError as err:
        errors.put((type(err).__name__, str(err)))
