"""benchmarks/gpu.py, the GPU run prepared ahead of a lent GPU, cannot rot: the same script end to
end on the tiny pipelines on CPU, as the GPU machine's Python runs it (no Ray, MLflow or decord),
one case of each kind; and its plan and time budget."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import torch

from svdray.config import SpeedConfig
from tests.support.gpu_machine import MISSING, assert_counted, assert_measured, gpu_machine_env
from tests.support.paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402
import memory  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))

# One case of each kind, in the plan's order: a Wan model (cached step, with memory.py's count),
# its fp8 base (skipped without configs/wan_i2v_14b_fp8.yaml), the SVD step on decoded clips (a
# speed row) and with torch.compile (not on a CPU). SVD's cached step and its memory row run in
# tests/integration/test_gpu_wheelhouse.py (gpu.sh from the wheelhouse).
CASES = [
    "wan2.1-i2v-14b",
    "wan2.1-i2v-14b fp8",
    "svd-xt speed.channels_last=true",
    "svd-xt speed.compile_denoiser=true",
]


def test_tiny_run_reports_every_field_of_each_kind_of_case(tmp_path):
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu.py"),
        "--tiny",
        "--out",
        str(out),
        "--budget-s",  # no case skipped however loaded this machine is (the budget: the last test)
        "100000",
        "--only",
        *CASES,
    ]
    env = gpu_machine_env(tmp_path / "gpu-machine")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    print(f"tiny CPU run: {report['elapsed_s']:.1f} s")

    assert report["environment"]["imported"] == dict.fromkeys(MISSING, False)
    assert report["environment"]["device_type"] == "cpu"
    cases = {c["name"]: c for c in report["cases"]}
    assert list(cases) == CASES

    wan, decoded = cases["wan2.1-i2v-14b"], cases["svd-xt speed.channels_last=true"]
    for case in (wan, decoded):
        assert_measured(case, report)
    assert wan["settings"]["data.cache"] and wan["settings"]["lora.rank"] == 32  # the shipped config's
    assert_counted(wan)  # one rank's count of the transformer step
    assert decoded["group"] == "speed" and decoded["settings"]["speed.channels_last"] is True
    assert not decoded["settings"]["data.cache"] and "memory_count" not in decoded

    fp8_config = gpu.MODELS["wan2.1-i2v-14b-fp8"].config
    skipped = f"skipped: no {fp8_config} in this checkout"
    fp8 = cases["wan2.1-i2v-14b fp8"]
    assert fp8["status"] == ("ok" if (REPO / fp8_config).exists() else skipped)
    if fp8["status"] == "ok":  # the tiny run keeps the fp8 base (and its bf16 compute)
        assert fp8["settings"]["model.denoiser_dtype"] == "float8"
        assert_measured(fp8, report)
    assert cases["svd-xt speed.compile_denoiser=true"]["status"].startswith("skipped: --tiny")


def test_plan_runs_the_shipped_configs_first_then_each_option_flipped():
    cases = gpu.plan_cases(torch.device("cuda"))
    assert [c.name for c in cases[:4]] == ["svd-xt", "wan2.2-ti2v-5b", "wan2.1-i2v-14b", "wan2.1-i2v-14b fp8"]
    assert all(c.group == "model" and not c.overrides for c in cases[:4])

    baseline, _ = gpu.case_config(cases[0], None)
    rows = [c for c in cases if c.group == "memory"]
    assert [c.name for c in rows] == [f"svd-xt {label}" for label, _ in memory.option_variants(baseline)[1:]]
    speed = [c for c in cases if c.group == "speed"]
    assert {c.overrides[0].split("=")[0] for c in speed} == {f"speed.{f.name}" for f in fields(SpeedConfig)}
    assert speed[-1].name == cases[-1].name == "svd-xt speed.compile_denoiser=true"  # the slowest last

    base = gpu.settings(baseline)
    for case in cases[1:]:
        if not (REPO / gpu.MODELS[case.model].config).exists():
            continue
        cfg, architecture = gpu.case_config(case, None)
        assert architecture == gpu.MODELS[case.model].architecture
        changed = {k for k, v in gpu.settings(cfg).items() if v != base[k]}
        if case.group == "speed":  # exactly the one option it flips
            assert changed == {case.overrides[0].split("=")[0]}, case


def test_no_case_starts_that_would_end_past_the_budget():
    assert gpu.over_budget(100.0, None) is None  # not counted yet: it starts
    assert gpu.over_budget(100.0, 60.0) is None
    assert "60 s left" in gpu.over_budget(60.0, 100.0)
    assert gpu.over_budget(0.0, None) == gpu.over_budget(-5.0, 1.0) == "skipped: time budget (used up)"
