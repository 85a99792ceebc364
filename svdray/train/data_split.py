"""How Ray Train splits the training stream over the workers.

Its own module, importing only Ray: Ray Train unpickles the trainer's `dataset_config` in its
controller and dataset-manager actors, and a class in a module that imports torch, peft and
diffusers would make each of those processes import them too (seconds of CPU per run, for
nothing)."""

from __future__ import annotations

from typing import Any

import ray.data
import ray.train


class DataParallelSplit(ray.train.DataConfig):
    """Ray Train's split of the stream, one shard per data-parallel rank: under context parallelism
    (`train.context_parallel: N`) the first worker of each group of N reads the group's shard and
    hands each batch to the others (`Parallel.shared_batches`); they read nothing (Ray Train
    wants an iterator for every worker: an empty one). N = 1 is Ray's own split."""

    def __init__(self, context_parallel: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.context_parallel = context_parallel

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: list | None,
        worker_node_ids: list | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        n = self.context_parallel
        if n == 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        readers = [None if ids is None else ids[::n] for ids in (worker_handles, worker_node_ids)]
        shards = super().configure(datasets, world_size // n, *readers, **kwargs)
        empty = {name: dataset.limit(0).iterator() for name, dataset in datasets.items()}
        return [shards[rank // n] if rank % n == 0 else empty for rank in range(world_size)]
