"""`train.parallel`'s checks, its HSDP mesh and activation offloading, on one process. The runs on
real gloo ranks (FSDP2 and HSDP against DDP, sharded checkpoints) are
tests/integration/test_sharded_steps.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from svdray.config import ConfigError, config_from_dict
from svdray.train.parallel import node_grid
from tests.support.parallel_runs import run_config


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("parallel") / "tiny-wan", "i2v", seed=0)


def test_hsdp_mesh_is_nodes_by_workers() -> None:
    assert node_grid(["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert node_grid(["b", "a", "b", "a"]) == [[0, 2], [1, 3]]  # wherever Ray put the ranks
    with pytest.raises(ValueError, match="same number of workers on every node"):
        node_grid(["a", "a", "a", "b"])


def test_parallel_is_checked_before_anything_starts(tiny_pipeline_dir) -> None:
    tree = run_config(tiny_pipeline_dir, "svd")
    with pytest.raises(ConfigError, match="train.parallel"):
        config_from_dict({**tree, "train": {**tree["train"], "parallel": "zero3"}}, check_files=False)
    with pytest.raises(ConfigError, match="train.parallel: hsdp .* train.placement: pack"):
        config_from_dict(
            {**tree, "train": {**tree["train"], "parallel": "hsdp", "placement": "spread"}}, check_files=False
        )


def test_offloaded_activations_compute_the_same_step(wan_dir) -> None:
    """train.offload_activations keeps the forward's saved tensors in host memory until backward
    (on a GPU; on this CPU the copies are the same bytes): the loss and every LoRA gradient are
    those of the step without it, bit for bit."""
    from svdray.models import family_of
    from svdray.train.parallel import Workers, parallelize
    from svdray.train.step import accumulate_gradients
    from tests.support.parallel_runs import batches

    results = []
    for offload in (False, True):
        tree = run_config(wan_dir, "wan", denoiser_dtype="bfloat16")
        tree["train"] |= {
            "num_workers": 1,
            "grad_accum": 1,
            "mixed_precision": "bf16",
            "offload_activations": offload,
        }
        cfg = config_from_dict(tree, check_files=False)
        family = family_of(cfg)
        torch.manual_seed(0)
        models = family.build_models(cfg, torch.device("cpu"))
        parallel = parallelize(
            models.denoiser, family.blocks(models.denoiser), "ddp", torch.device("cpu"), Workers()
        )
        loss = accumulate_gradients(
            parallel, models, family, batches(1, 1, 0, 1), cfg, torch.Generator().manual_seed(0), 1
        )
        grads = {n: p.grad for n, p in models.denoiser.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (loss, grads), (offloaded_loss, offloaded_grads) = results
    assert torch.equal(offloaded_loss, loss) and grads.keys() == offloaded_grads.keys() and grads
    assert all(torch.equal(offloaded_grads[n], g) for n, g in grads.items())
