"""The benchmark scripts run end to end on the tiny model (CPU, a couple of steps), so they never rot.

Timings are the scripts' business (benchmarks/RESULTS.md); here only their structure and the
figures that do not depend on the machine's speed are checked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.paths import REPO as ROOT


def run_script(script: str, args: list[str], ray_cluster, out: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        # Join the session's cluster instead of starting a second one.
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
    }
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_train_step_tiny_plain_trainer_and_variants(ray_cluster, tmp_path):
    report = run_script(
        "train_step.py",
        [
            "--tiny",
            "--warmup", "1",
            "--steps", "2",
            "--set", "train.log_every=1",
            "--vary", "speed.attention=math", "cached_latents",
            "--cpus-per-worker", "1",
        ],
        ray_cluster,
        tmp_path / "train_step.json",
    )  # fmt: skip
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["versions"]["torch"] == torch.__version__
    assert report["matmul"]["dtype"] == "float32" and report["matmul"]["flops_per_s"] > 0

    results = {(r["variant"], r["path"]): r for r in report["results"]}
    assert list(results) == [
        ("baseline", "plain"),
        ("baseline", "trainer"),
        ("speed.attention=math", "plain"),
        ("cached_latents", "plain"),
    ]
    for r in results.values():
        assert r["status"] == "ok", r["status"]
        assert r["case"] == {
            "frames": 8,
            "height": 32,
            "width": 32,
            "batch": 1,
            "rank": 4,
            "label": "8x32x32 b1 r4",
        }
        assert r["timed_steps"] == 2 and len(r["step_s_all"]) == 2
        assert 0 < r["step_s_min"] <= r["step_s_median"]
        assert math.isclose(r["frames_per_s"], 8 * r["samples_per_s"])
        assert math.isclose(r["samples_per_s"], 1 / r["step_s_mean"])
        assert r["peak_memory_bytes"] > 100 * 2**20 and r["memory_kind"] == "process peak RSS"
        assert math.isclose(r["mfu"], r["flops_per_step"] / r["step_s_median"] / r["matmul_flops_per_s"])
    assert results[("speed.attention=math", "plain")]["settings"]["speed.attention"] == "math"
    assert results[("cached_latents", "plain")]["settings"]["cached_latents"] is True

    # The same step has the same FLOPs whatever runs it; without the encoders it has fewer.
    full = results[("baseline", "plain")]["flops_per_step"]
    assert results[("baseline", "trainer")]["flops_per_step"] == full
    assert results[("speed.attention=math", "plain")]["flops_per_step"] == full
    cached = results[("cached_latents", "plain")]
    assert 0 < cached["flops_per_step"] < full
    assert "aten.convolution_backward" in cached["flops_by_op"]

    # The trainer ran svdray's loop in a Ray worker with one CPU: Ray set its thread count.
    trainer = results[("baseline", "trainer")]
    assert trainer["omp_num_threads"] == "1" and trainer["torch_threads"] == 1
    assert trainer["log_every"] == 1 and trainer["loop_step_s_median"] > 0
    (comparison,) = report["comparisons"]
    assert comparison["case"] == "8x32x32 b1 r4" and comparison["trainer_over_plain_throughput"] > 0
