"""The benchmark scripts run end to end on the tiny model (CPU, a couple of steps), so they never rot.

Timings are the scripts' business (benchmarks/RESULTS.md); here only their structure and the
figures that do not depend on the machine's speed are checked.
"""

from __future__ import annotations

import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from svdray.config import config_from_dict
from svdray.models.svd.family import SVDFamily
from tests.support.paths import REPO as ROOT


def test_flops_counted_on_meta_equal_the_real_step(tiny_pipeline_dir):
    """MFU's numerator: the meta-device count equals FlopCounterMode on the real step when all
    attention (CLIP's too) runs as plain matmuls, with and without the encoders. (On a CPU, torch's
    default flash kernel is not counted at all: one reason the benchmark counts on meta.)"""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_step import count_step_flops, example_batch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    cfg = config_from_dict(
        {
            "model": {"pretrained": str(tiny_pipeline_dir)},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "train": {"batch_size": 2},
            "lora": {"rank": 4, "alpha": 4},
            "speed": {"attention": "math"},
        },
        check_files=False,
    )
    built = SVDFamily().build_models(cfg, torch.device("cpu"))
    real = built.frozen, built.denoiser
    meta = SVDFamily().meta_models(cfg)
    meta = meta.frozen, meta.denoiser
    for cached in (False, True):
        with sdpa_kernel(SDPBackend.MATH):
            counted = count_step_flops(
                *real, cfg, example_batch(cfg, "cpu"), cached, torch.Generator().manual_seed(0)
            )
        on_meta = count_step_flops(*meta, cfg, example_batch(cfg, "meta"), cached)
        assert on_meta == counted
        assert counted["total"] > 0
