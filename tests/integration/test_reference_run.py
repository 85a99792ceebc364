"""Behaviour unchanged: the reference run (tests/support/record_reference_run.py) still trains
the LoRA recorded in tests/data/reference_run.json, step losses and every tensor.

The recording was made on one CPU; this compares on any. Float32 results differ across CPUs'
kernels (ATEN_CPU_CAPABILITY: default, AVX2, AVX-512) in the order sums are taken, by about the
float32 epsilon (1.2e-7) times the depth a value passes through, forward and backward: a relative
1e-5 for the loss and for what the LoRA learns in 5 Adam steps (Adam passes a relative gradient
difference on to its update at most 1:1). The bounds below are 1e-5 (loss) and 1e-4 (tensors).
"""

from __future__ import annotations

import json

import numpy as np

from tests.support.record_reference_run import REFERENCE, run_reference


def learns_only_rounding_noise(name: str) -> bool:
    """The LoRA B of a cross-attention query or key: SVD's UNet cross-attends to one token (the
    CLIP image embedding), so the softmax is 1 whatever the query and key, their gradient is zero
    but for rounding noise, and Adam turns that noise into updates whose signs follow the CPU's
    kernels (the B weights start at zero, so they hold nothing else)."""
    return ".attn2.to_q.lora_B." in name or ".attn2.to_k.lora_B." in name


def test_reference_run_is_unchanged(ray_cluster, tmp_path, tiny_pipeline_dir):
    expected = json.loads(REFERENCE.read_text())
    actual = run_reference(tmp_path, tiny_pipeline_dir)

    assert [step for step, _ in actual["loss"]] == [step for step, _ in expected["loss"]]
    np.testing.assert_allclose(
        [loss for _, loss in actual["loss"]],
        [loss for _, loss in expected["loss"]],
        rtol=1e-5,
        err_msg="the train/loss curve changed",
    )

    assert sorted(actual["tensors"]) == sorted(expected["tensors"]), "the LoRA's tensor names changed"
    same_bytes = [
        name for name, t in actual["tensors"].items() if t["sha256"] == expected["tensors"][name]["sha256"]
    ]
    bytes_note = f"sha256 of the bytes matched for {len(same_bytes)}/{len(expected['tensors'])} tensors"
    print(bytes_note)
    noise = [name for name in expected["tensors"] if learns_only_rounding_noise(name)]
    assert len(noise) == 16  # query and key of the 8 cross-attentions (4 spatial, 4 temporal)
    learned = [
        want["norm"] for name, want in expected["tensors"].items() if "lora_B" in name and name not in noise
    ]
    for name, want in expected["tensors"].items():
        got = actual["tensors"][name]
        assert (got["shape"], got["dtype"]) == (want["shape"], want["dtype"]), f"{name}; {bytes_note}"
        if name in noise:  # by size only: noise, far below every LoRA B that learns
            assert got["norm"] < 0.05 * min(learned), f"{name}: {got['norm']}; {bytes_note}"
            continue
        for stat in ("sum", "norm", "first"):
            np.testing.assert_allclose(
                got[stat], want[stat], rtol=1e-4, atol=1e-7, err_msg=f"{name} {stat}; {bytes_note}"
            )
