"""What the workers of one run agree on: RNG states gathered for a checkpoint, metrics averaged
over the workers, and one decision per step on whether an update is finite everywhere."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rng_snapshot(generator: torch.Generator, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Every worker's RNG states, gathered on all ranks (rank 0 writes them into the checkpoint)."""
    mine = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    gathered = [mine]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
    return {f"rank{r}.{name}": state for r, states in enumerate(gathered) for name, state in states.items()}


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, rank: int) -> bool:
    if f"rank{rank}.noise" not in states:
        return False  # the world size changed: keep the fresh per-rank seeds
    torch.set_rng_state(states[f"rank{rank}.torch"])
    generator.set_state(states[f"rank{rank}.noise"])
    if torch.cuda.is_available() and f"rank{rank}.cuda" in states:
        torch.cuda.set_rng_state(states[f"rank{rank}.cuda"])
    return True


def mean_across_workers(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        value /= dist.get_world_size()
    return value.item()


def all_workers_finite(*values: torch.Tensor) -> bool:
    """True only if every value is finite on every worker: all ranks must take the same decision
    about an update, or the DDP replicas would drift apart."""
    bad = torch.zeros((), device=values[0].device)
    for value in values:
        bad += (~torch.isfinite(value.detach())).any().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return bad.item() == 0
