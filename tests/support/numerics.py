"""Tolerances from the arithmetic a comparison checks, not from what one CPU printed.

CPUs differ in the kernels ATen picks (`ATEN_CPU_CAPABILITY`: default, AVX2, AVX-512, AMX), and
with them the order of floating-point reductions and how bf16 products are accumulated. So:

- two float32 computations of the same value that differ only in reduction order agree to a few
  hundred float32 epsilons relative to the magnitude of what was summed, never bit for bit;
- a gradient is compared as one vector (the relative error of the concatenation, and its cosine),
  not tensor by tensor: some LoRA tensors get a gradient that is rounding noise (e.g. the
  cross-attention query of SVD's UNet, whose softmax runs over one image token), and a per-tensor
  relative bound on noise holds on one CPU and fails on the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

FLOAT32_EPS = 2.0**-23  # float32: 24-bit significand
BF16_EPS = 2.0**-8  # bfloat16: 8-bit significand (7 stored bits + the implicit one)
# Float32 results of one computation under two reduction orders (another kernel, another blocking,
# recomputation under checkpointing): a few hundred epsilons relative over a tiny model's depth.
FLOAT32_REORDER_RTOL = 1e-4  # ~840 float32 epsilons


def flat(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of every tensor, in order (a mapping in its key order)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.detach().double().flatten() for t in values])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def cosine(got: torch.Tensor, expected: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(got, expected, dim=0).item()


def assert_same_vector(got, expected, rtol: float = FLOAT32_REORDER_RTOL, what: str = "gradient") -> None:
    """`got` and `expected` (tensors, lists or name->tensor mappings of the same layout) agree as
    one vector: ||got - expected|| <= rtol * ||expected||."""
    if isinstance(expected, Mapping):
        assert list(got) == list(expected), f"{what}: different tensors"
    a, b = flat(got), flat(expected)
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    assert b.norm() > 0, f"{what}: the expected vector is zero"
    error = relative_error(a, b)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.3g}"
