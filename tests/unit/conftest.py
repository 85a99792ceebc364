"""The unit tier's contract: no Ray cluster (tests/integration holds the tests that need one)."""

from __future__ import annotations

import sys

import pytest


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def starts_no_ray():
    """Fails the test that connected this process to Ray (e.g. a Ray Data call that starts one)."""
    before = ray_running()
    yield
    if not before and ray_running():
        pytest.fail("this test started Ray: it belongs in tests/integration")


@pytest.fixture(autouse=True)
def one_torch_thread(torch_single_thread):
    """Every unit test runs torch on one intra-op thread: the tiny models gain nothing from more,
    and on a small shared machine extra threads spin against the other processes."""
