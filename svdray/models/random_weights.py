"""Full-size models with random weights, made on the device they run on (benchmarks).

Timing a step of a 14B transformer needs its weights' shapes and dtypes, not its checkpoint:
reading 30 GB, or initialising 14B parameters on a CPU, would take minutes of a short GPU lease.
So a family's `random_models` builds its pipeline inside `empty_parameters()` (parameters on the
meta device: no storage, no initialisation; buffers such as rotary tables and position ids
computed as usual, as diffusers' own loading does before it reads a checkpoint), casts it to the
dtypes loading gives, and `fill_random` then gives each parameter storage on the device, filled
there in one kernel per tensor. What follows is `build_models`' own code: LoRA, dtypes, gradient
checkpointing, `speed.*`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

# Dtypes `Tensor.normal_` fills directly; any other (float8) is filled in float32 and cast.
_NORMAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers computed
    (accelerate's `init_empty_weights(include_buffers=False)`, what diffusers loads under)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def to_device(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`module.to(device)` for a module just built, leaving parameters that `empty_parameters()`
    put on the meta device there (`fill_random` gives them storage). A builder calls it once its
    modules are built: tensors a constructor makes with the legacy `torch.Tensor(...)` ignore
    the device context."""
    device = torch.device(device)
    return module._apply(lambda t: t if t.is_meta else t.to(device))


def _random_value(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, generator):
    """Values of the scale default initialisation gives: weights N(0, 1 / fan_in) (unit-variance
    outputs, so deep stacks stay finite in bf16), norm scales 1, biases 0."""
    if len(shape) <= 1:
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    fan_in = math.prod(shape) // shape[0]
    work = dtype if dtype in _NORMAL_DTYPES else torch.float32
    value = torch.empty(shape, dtype=work, device=device).normal_(0.0, fan_in**-0.5, generator=generator)
    return value.to(dtype)


@torch.no_grad()
def fill_random(modules: Iterable[torch.nn.Module], device: str | torch.device, seed: int = 0) -> None:
    """Give every parameter on the meta device storage on `device` in its dtype, with random
    values made there (no CPU work, one kernel per tensor), and move the buffers to `device`.
    Parameters shared between modules stay shared. Same seed and device, same weights."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for root in modules:
        # transformers ties embeddings by assignment, which `empty_parameters` turns into two
        # parameters: tie them again, as `from_pretrained` does once it has loaded.
        if callable(getattr(root, "tie_weights", None)):
            root.tie_weights()
        for module in root.modules():
            for name, param in module._parameters.items():
                if param is None or not param.is_meta:
                    continue
                if id(param) not in made:
                    value = _random_value(name, param.shape, param.dtype, device, generator)
                    made[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
        for name, buffer in root.named_buffers():
            if buffer.is_meta:
                raise ValueError(f"{type(root).__name__}.{name}: a buffer on the meta device has no values")
        to_device(root, device)
