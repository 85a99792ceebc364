"""The GPU machine's Python as benchmarks/gpu.py meets it: the image's packages and the wheelhouse's
(benchmarks/wheelhouse.py), nothing else. Ray, MLflow and decord are not there."""

from __future__ import annotations

import os
import statistics
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from wheelhouse import IMAGE, WHEELS  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))

MISSING = ("ray", "mlflow", "decord")
GIB = 2**30


def requirements_closure(roots: tuple[str, ...], stop: tuple[str, ...] = ()) -> set[str]:
    """The installed distributions `roots` need, themselves included (canonical names; `stop`
    and what only it needs left out)."""
    stop_names = {canonicalize_name(n) for n in stop}
    found: set[str] = set()
    todo = [canonicalize_name(n) for n in roots]
    while todo:
        name = todo.pop()
        if name in found or name in stop_names:
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        found.add(name)
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


def blocked_modules() -> list[str]:
    """Top-level modules installed here whose distributions are neither the image's (with what
    they need, huggingface_hub aside: the wheelhouse carries its own) nor the wheelhouse's."""
    allowed = requirements_closure(IMAGE, stop=("huggingface_hub",))
    allowed |= {canonicalize_name(n) for n in (*WHEELS, "svdray")}
    blocked = {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in allowed for d in dists)
    }
    return sorted(blocked | set(MISSING))


def gpu_machine_env(folder: Path) -> dict[str, str]:
    """The environment of a subprocess in which only the image's and the wheelhouse's packages
    import, as on the GPU machine: a `sitecustomize` in `folder`, first on PYTHONPATH, marks every
    other installed top-level module missing (`sys.modules[name] = None`: `import` raises
    ImportError, `importlib.util.find_spec` says None, as for a package not installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\n\nfor name in {blocked_modules()!r}:\n    sys.modules.setdefault(name, None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PYTHONPATH": str(folder)}


def assert_measured(case: dict, report: dict) -> None:
    """A case of a --tiny run (1 warm-up + 2 timed steps) measured, with its FLOPs and MFU."""
    assert case["status"] == "ok", case
    assert case["overrides"][0] == "train.grad_accum=1"
    assert (case["warmup"], case["steps"]) == (1, 2)
    assert len(case["step_s_all"]) == case["timed_steps"] == 2
    assert case["step_s_median"] == pytest.approx(statistics.median(case["step_s_all"]))
    assert case["step_s_median"] > 0
    assert case["case_s"] >= case["build_s"] > 0 and case["peak_memory_bytes"] > 0
    assert case["flops_per_step"] > 0 and case["expected_s"] > 0
    rate = report["matmul"]["flops_per_s"]
    assert case["mfu"] == pytest.approx(case["flops_per_step"] / case["step_s_median"] / rate)


def assert_counted(case: dict) -> None:
    """benchmarks/memory.py's count beside the measured peak."""
    estimate = case["memory_count"]["estimated_peak_gib"]
    assert estimate > 0
    assert case["measured_over_count"] == pytest.approx(case["peak_memory_bytes"] / (estimate * GIB))
