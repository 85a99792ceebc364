"""Behaviour unchanged: the reference run (tests/support/record_reference_run.py) still trains
the LoRA recorded in tests/data/reference_run.json, step losses and every tensor."""

from __future__ import annotations

import json

import numpy as np

from tests.support.record_reference_run import REFERENCE, run_reference


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
    for name, want in expected["tensors"].items():
        got = actual["tensors"][name]
        assert (got["shape"], got["dtype"]) == (want["shape"], want["dtype"]), f"{name}; {bytes_note}"
        for stat in ("sum", "norm", "first"):
            np.testing.assert_allclose(
                got[stat], want[stat], rtol=1e-4, atol=1e-7, err_msg=f"{name} {stat}; {bytes_note}"
            )
