"""`make wheelhouse` and benchmarks/gpu.sh as the GPU machine runs them: the wheels built here,
installed there into a folder of their own, and the benchmark run from them with nothing else but
the image's packages (tests/support/gpu_machine.py). The wheelhouse is built for this Python (the
GPU machine's is 3.12: the same wheels, other tags for the compiled ones) so that this machine
can run what it installs; one tiny case on CPU, SVD's cached step with memory.py's count (the
unit test runs the other kinds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.support.gpu_machine import MISSING, assert_counted, assert_measured, gpu_machine_env
from tests.support.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from wheelhouse import WHEELS  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))

MIB = 2**20
CARRY_LIMIT_MIB = 64  # what a device run carries, the working tree included


def test_wheelhouse_installs_and_runs_the_benchmark_on_the_image_packages(tmp_path):
    wheels = tmp_path / "whl"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run(
        ["make", "-s", "wheelhouse", f"WHEELHOUSE={wheels}", f"WHEEL_PYTHON={python}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size_line = next(line for line in build.stdout.splitlines() if line.startswith("wheelhouse "))
    print(size_line)
    names = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels.glob("*.whl")}
    assert names == {canonicalize_name(n) for n in (*WHEELS, "svdray")}
    assert not names & {canonicalize_name(n) for n in (*MISSING, "torch")}
    # It travels with the working tree: both within what a device run carries.
    size = sum(w.stat().st_size for w in wheels.glob("*.whl"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tree = sum((REPO / name).stat().st_size for name in tracked.decode().split("\0") if name)
    assert size + tree < CARRY_LIMIT_MIB * MIB, f"wheels {size / MIB:.1f} MiB, tree {tree / MIB:.1f} MiB"

    site, out = tmp_path / "site", tmp_path / "out"
    env = gpu_machine_env(tmp_path / "gpu-machine") | {
        "PYTHON": sys.executable,
        "WHEELS": str(wheels),
        "SITE": str(site),
        "OUT": str(out),
    }
    command = [
        "bash",
        "benchmarks/gpu.sh",
        "--tiny",
        "--budget-s",
        "100000",
        "--only",
        "svd-xt cached_latents",
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "is not this checkout's" not in run.stderr  # the wheel holds the checkout's code

    report = json.loads((out / "gpu_bench.json").read_text())
    (cached,) = report["cases"]
    assert_measured(cached, report)
    assert cached["group"] == "memory" and cached["settings"]["data.cache"]
    assert_counted(cached)
    modules = report["environment"]["modules"]
    for package in ("svdray", "diffusers", "transformers", "peft", "accelerate"):
        assert Path(modules[package]).is_relative_to(site), (package, modules[package])
    assert not Path(modules["torch"]).is_relative_to(site)  # the machine's own torch
    assert report["environment"]["imported"] == dict.fromkeys(MISSING, False)
    assert (out / "gpu_bench.log").read_text().count("svd-xt cached_latents") >= 2  # plan and result rows
