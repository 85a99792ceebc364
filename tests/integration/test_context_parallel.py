"""`train.context_parallel` on real gloo ranks (spawned processes, no Ray), tiny Wan: a clip split
over two workers (diffusers' own context parallelism, Ulysses) gives the loss and the LoRA
gradients of one worker training on the whole clip, for the I2V layout (one timestep per clip)
and the TI2V one (a timestep per token, split with the tokens), under DDP and FSDP2; and the
config refuses what cannot be split, before anything starts.

The tolerance comes from what differs, in float32 (no autocast): the split run computes every
value the whole run computes, in another order of float32 sums only. Each worker projects its
half of the tokens (row by row, as the whole run does); Ulysses gives each worker all the tokens
of half of the heads, so each attention row is the whole run's softmax over all keys; what
changes is where sums over tokens are taken: a weight gradient is the sum over the tokens of
two halves (one per worker, then added by the gradient reduction), the attention kernel's
blocking over a differently laid out batch, the RMS norm across heads. Two float32 orders of one
sum of n terms differ by at most about n u relative to the sum of magnitudes (u = 2^-24), and
through the tiny model's depth that stays within `FLOAT32_REORDER_RTOL` (840 epsilons) of the
gradient vector's norm (tests/support/numerics.py), the bound every reorder comparison of the
suite uses. The loss (the mean over the gathered prediction) and the gradient norm likewise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdray.config import ConfigError, config_from_dict
from svdray.train.parallel import ContextParallel, context_grid, data_rank
from tests.support.numerics import FLOAT32_REORDER_RTOL, assert_same_vector
from tests.support.parallel_runs import NUM_FRAMES, gradient_step, on_ranks

# Token counts: 9 frames are 3 latent frames; I2V's 8x VAE and 2x2 patches make 32x32 pixels
# 2x2 tokens a frame; TI2V's 16x VAE needs 64x64 for as many.
SIZES = {"i2v": 32, "ti2v": 64}
TOKENS = 3 * 2 * 2


def tree(pretrained: Path, layout: str, workers: int, context: int) -> dict:
    return {
        "model": {"family": "wan", "pretrained": str(pretrained)},
        "data": {"num_frames": NUM_FRAMES, "height": SIZES[layout], "width": SIZES[layout]},
        "lora": {"rank": 4, "alpha": 4, "feed_forward": True},
        "train": {
            "num_workers": workers,
            "context_parallel": context,
            "grad_accum": 2,  # gradient sync skipped on the first micro-batch
            "gradient_checkpointing": True,  # each block's forward (and its all-to-alls) recomputed
        },
        "wan": {"prompt_dropout": 0.5},  # drawn per clip: must be the same draw on both workers
    }


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    from svdray.models.wan.pipeline import save_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("context-parallel")
    return {layout: save_tiny_wan_pipeline(root / layout, layout, seed=0) for layout in SIZES}


@pytest.fixture(scope="module")
def steps(pipelines, tmp_path_factory) -> Path:
    """One update of each layout: on one worker, whole clips (in this process); on two workers
    splitting each clip (spawned), under DDP and FSDP2."""
    out = tmp_path_factory.mktemp("context-parallel-steps")
    whole = [
        {"name": f"{layout}-whole", "strategy": "ddp", "config": tree(pipelines[layout], layout, 1, 1)}
        for layout in SIZES
    ]
    gradient_step(0, 1, "", whole, str(out))
    split = [
        {
            "name": f"{layout}-{strategy}",
            "strategy": strategy,
            "config": tree(pipelines[layout], layout, 2, 2),
        }
        for layout, strategy in (("i2v", "ddp"), ("i2v", "fsdp"), ("ti2v", "fsdp"))
    ]
    on_ranks(gradient_step, 2, (split, str(out)))
    return out


@pytest.mark.parametrize("layout, strategy", [("i2v", "ddp"), ("i2v", "fsdp"), ("ti2v", "fsdp")])
def test_split_clip_gives_the_whole_clips_loss_and_gradients(steps: Path, layout: str, strategy: str) -> None:
    whole = load_file(str(steps / f"{layout}-whole.safetensors"))
    split = load_file(str(steps / f"{layout}-{strategy}.safetensors"))
    # The clip was split: each worker's attention saw half of its tokens (every micro-batch, and
    # again in each recomputation under checkpointing).
    assert set(whole["tokens"].tolist()) == {TOKENS}
    assert set(split["tokens"].tolist()) == {TOKENS // 2}
    torch.testing.assert_close(split["loss"], whole["loss"], rtol=FLOAT32_REORDER_RTOL, atol=0)
    torch.testing.assert_close(split["grad_norm"], whole["grad_norm"], rtol=FLOAT32_REORDER_RTOL, atol=0)
    grads = {k: v for k, v in whole.items() if k.startswith("grad/")}
    assert len(grads) > 20  # every LoRA tensor (the A matrices get none yet: B starts at zero)
    assert_same_vector({k: split[k] for k in grads}, grads, what=f"{layout} {strategy} LoRA gradient")


def test_mesh_groups_consecutive_ranks() -> None:
    assert context_grid(4, ContextParallel(2)) == [[[0, 1]], [[2, 3]]]  # (data, ring, ulysses)
    assert context_grid(4, ContextParallel(2, "ring")) == [[[0], [1]], [[2], [3]]]
    assert [data_rank(rank, ContextParallel(2)) for rank in range(4)] == [0, 0, 1, 1]


def test_the_global_batch_counts_data_parallel_ranks(pipelines) -> None:
    cfg = config_from_dict(tree(pipelines["i2v"], "i2v", 4, 2), check_files=False)
    assert cfg.train.data_parallel(4) == 2
    assert cfg.train.global_batch() == 1 * 2 * 2  # batch_size x grad_accum x data-parallel ranks
    assert cfg.train.at_world_size(4).grad_accum == 2


def test_what_cannot_be_split_is_refused_before_anything_starts(pipelines, tiny_pipeline_dir) -> None:
    def refused(base: dict, match: str, **train) -> None:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "train": {**base["train"], **train}}, check_files=False)

    wan = tree(pipelines["i2v"], "i2v", 2, 2)
    # The tiny transformer has 2 heads: Ulysses over 4 workers would give each half a head.
    refused(
        wan,
        r"train.context_parallel: 4 \(Ulysses\) must divide the 2 attention heads",
        num_workers=4,
        context_parallel=4,
    )
    refused(
        wan, r"train.context_parallel: 2 workers per clip must divide train.num_workers \(3\)", num_workers=3
    )
    refused(wan, r"train.num_workers: elastic", num_workers=[2, 4])
    refused(
        wan, r"train.context_parallel_kind: ring needs an attention backend", context_parallel_kind="ring"
    )
    refused(wan, r"train.context_parallel: must be at least 1", context_parallel=0)
    svd = {
        "model": {"family": "svd", "pretrained": str(tiny_pipeline_dir)},
        "train": {"num_workers": 2, "context_parallel": 2},
    }
    refused(svd, r"train.context_parallel: 2, but model.family svd's denoiser has no context-parallel plan")


def test_token_count_must_split_evenly(pipelines) -> None:
    """Checked when the pipeline loads (the VAE's compression is the pipeline's): TI2V at 32x32
    is 3 tokens, which two workers cannot share."""
    from svdray.models import family_of

    cfg = config_from_dict(
        {
            **tree(pipelines["ti2v"], "ti2v", 2, 2),
            "data": {"num_frames": NUM_FRAMES, "height": 32, "width": 32},
        },
        check_files=False,
    )
    with pytest.raises(ConfigError, match=r"train.context_parallel: 2 workers must split the 3 tokens"):
        family_of(cfg).build_models(cfg, torch.device("cpu"))
