"""The model-family interface: the registry, family config sections, and SVD's family methods on
batches as the data layer delivers them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

from svdray.config import ConfigError, config_from_dict
from svdray.data.video import motion_score
from svdray.models import FAMILIES, family_of, get_family
from svdray.models.svd import loss
from svdray.models.svd.buckets import motion_bucket_ids
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.pipeline import FrozenModels


def reference_bucket(frames: torch.Tensor, scale: float) -> float:
    """SVD's motion bucket of a clip, computed independently: scale x the temporal std of each
    pixel (0..255 units), averaged, rounded, clamped to 1..255."""
    return float(
        min(max(round(scale * frames.numpy().astype(np.float64).std(axis=0, ddof=1).mean()), 1), 255)
    )


def test_registry_names_every_family_and_refuses_others():
    assert isinstance(get_family("svd"), SVDFamily)
    assert set(FAMILIES) == {"svd", "wan"}
    with pytest.raises(ValueError, match="model.family: 'sdxl'"):
        get_family("sdxl")
    with pytest.raises(ConfigError, match="model.family"):
        config_from_dict({"model": {"family": "sdxl"}}, check_files=False)


def test_a_family_section_belongs_to_its_family():
    cfg = config_from_dict({"svd": {"p_mean": 0.3}}, check_files=False)
    assert family_of(cfg).name == "svd" and cfg.svd.p_mean == 0.3
    with pytest.raises(
        ConfigError, match=r"^svd: options of model.family svd, but this run's model.family is wan"
    ):
        config_from_dict({"model": {"family": "wan"}, "svd": {"p_mean": 0.3}}, check_files=False)


def test_motion_bucket_rule(square_clip_frames):
    frames = square_clip_frames
    motion = torch.tensor([motion_score(frames)] * 3, dtype=torch.float64)
    manifest = torch.tensor([-1.0, 42.0, -1.0])
    derived = motion_bucket_ids(motion, manifest, None, 3.0)
    assert derived.dtype == torch.float32
    assert derived.tolist() == [reference_bucket(frames, 3.0), 42.0, reference_bucket(frames, 3.0)]
    assert 1 < derived[0] < 255  # the clip moves: neither clamp decides
    assert motion_bucket_ids(motion, manifest, 90, 3.0).tolist() == [90.0, 42.0, 90.0]
    # Clamped to SVD's range, and a still clip gets the lowest bucket, not zero.
    assert motion_bucket_ids(
        torch.tensor([1e4, 0.0], dtype=torch.float64), -torch.ones(2), None, 4.0
    ).tolist() == [
        255.0,
        1.0,
    ]


@pytest.fixture(scope="module")
def square_clip_frames(square_clip) -> torch.Tensor:
    from svdray.data.video import FrameSpec, decode_clip

    frames, _ = decode_clip(str(square_clip), FrameSpec(8, 7.0, 32, 32, "first", "center"), seed=0)
    return frames


def test_family_loss_is_svd_loss_with_the_clips_buckets(tiny_pipeline_dir, square_clip_frames):
    """SVDFamily.training_loss / validation_loss on a batch as the data layer delivers it (motion
    scores and manifest buckets) equal SVD's loss on the buckets training must use."""
    cfg = config_from_dict(
        {
            "model": {"pretrained": str(tiny_pipeline_dir)},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "svd": {"motion_bucket_id": None, "motion_bucket_scale": 3.0, "cfg_dropout": 0.2},
        },
        check_files=False,
    )
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    frozen = FrozenModels.from_pipeline(pipe)
    frames = square_clip_frames
    rng = np.random.default_rng(0)
    still = torch.from_numpy(rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)).expand(8, -1, -1, -1)
    video = torch.stack([frames, still.contiguous()])
    batch = {
        "video": video,
        "image": video[:, 0].contiguous(),
        "fps": torch.tensor([7.0, 12.0]),
        "motion": torch.tensor([motion_score(v) for v in video], dtype=torch.float64),
        "motion_bucket_id": torch.tensor([-1.0, 33.0]),
        "prompt": ["", ""],
    }
    expected = {**batch, "motion_bucket_id": torch.tensor([reference_bucket(frames, 3.0), 33.0])}
    family = SVDFamily()
    ours = family.training_loss(pipe.unet, frozen, batch, cfg, torch.Generator().manual_seed(5))
    reference = loss.training_loss(pipe.unet, frozen, expected, cfg.svd, torch.Generator().manual_seed(5))
    assert torch.equal(ours, reference)
    assert family.validation_loss(pipe.unet, frozen, batch, cfg, 3) == loss.validation_loss(
        pipe.unet, frozen, expected, seed=3
    )


TOY = "tests.support.toyfamily.config:ToyFamilyConfig"


def test_a_family_named_by_import_path_brings_its_section_and_rules(tmp_path):
    """A family defined outside svdray (tests/support/toyfamily) is found from the config alone:
    its section and rules apply, errors name the key, and the other sections' rules still hold."""
    from svdray.models import family_config
    from tests.support.toyfamily.config import ToyConfig
    from tests.support.toyfamily.family import ToyFamily

    cfg = config_from_dict({"model": {"family": TOY}, "toy": {"max_sigma": 0.5}}, check_files=False)
    assert cfg.family_section == "toy" and cfg.toy == ToyConfig(max_sigma=0.5)
    assert isinstance(family_of(cfg), ToyFamily) and family_config(TOY).name == "toy"
    # The tree round-trips with the toy section among the built-in families' (as a worker gets it).
    assert list(cfg.to_dict())[-4:] == ["svd", "wan", "toy", "output_dir"]
    assert config_from_dict(cfg.to_dict(), check_files=False) == cfg
    for tree, message in [
        ({"toy": {"max_sigma": 2.0}}, r"^toy.max_sigma: must be in \(0, 1\]"),
        ({"toy": {"sigma": 0.5}}, r"^toy.sigma: unknown key \(known keys here: max_sigma\)"),
        ({"data": {"height": 40}}, r"^data.height: 40 is not a multiple of 16 \(the toy denoiser's patch\)"),
        ({"svd": {"p_mean": 1.0}}, r"^svd: options of model.family svd, but this run's model.family is"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"model": {"family": TOY}, **tree}, check_files=False)
    # Another run knows no `toy` section: the family is the run's, not registered for all.
    with pytest.raises(ConfigError, match=r"^toy: unknown key"):
        config_from_dict({"toy": {"max_sigma": 0.5}}, check_files=False)
    for family, message in [
        ("tests.support.nowhere:Family", "model.family: cannot import"),
        ("tests.support.toyfamily.family:ToyFamily", "not a FamilyConfig subclass"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"model": {"family": family}}, check_files=False)
