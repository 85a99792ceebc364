"""Named Ray actors a run's driver owns (the data ledger, the progress board), on the driver's node.

Below everything that uses it (svdray/data, svdray/progress.py): it imports Ray alone.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def fresh_named_actor(actor_class: Any, name: str) -> Any:
    """A new named actor of `actor_class` (a `ray.remote` class) on the driver's node, replacing one
    of that name left over from an earlier run in this driver.

    On the driver's node because the run's bookkeeping must outlive any worker node: an actor
    without resources may otherwise land on a node that a preemption then takes with it."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    for _ in range(50):  # a killed actor's name is released asynchronously
        try:
            return actor_class.options(name=name, scheduling_strategy=on_this_node()).remote()
        except ValueError:
            time.sleep(0.1)
    raise RuntimeError(f"the actor name {name!r} stays taken: is another run with this name active?")


def on_this_node() -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
