"""What a shipped config's run must leave, checked alike for every config (test_configs.py, and
test_console.py for configs/demo.yaml): a finite LoRA, exported by `svdray export` as peft and
merged into the run's own base pipeline (its variant files included). The comfy format takes only
the full-size models' layouts, so the tiny runs do not export it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from svdray.export import export
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.safeload import check_pipeline_folder


def assert_finite_lora(lora_dir: Path) -> None:
    weights = load_file(str(lora_dir / ADAPTER_WEIGHTS))
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), lora_dir


def assert_run_exports(output_dir: Path, family: str, out: Path) -> None:
    """The run in `output_dir` exported into `out`: peft's adapter, and the merged pipeline."""
    assert_finite_lora(export(output_dir, "peft", out / "peft"))
    merged = export(output_dir, "merged", out / "merged")
    assert check_pipeline_folder(merged, "merged") == merged
    denoiser = "transformer" if family == "wan" else "unet"
    assert list(merged.glob(f"{denoiser}/*.safetensors")), sorted(merged.rglob("*"))
