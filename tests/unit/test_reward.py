"""Stage 2: rewards, and diagnostics that catch every known way to train on zero rewards
(tests/integration/test_reward.py: reward training on a real cluster)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from transformers import CLIPVisionModelWithProjection

from svdray import cli
from svdray.models.lora import lora_parameters
from svdray.models.svd.family import SVDFamily
from svdray.models.svd.sampler import sample_frames, sampling_spec
from svdray.reward.diagnostics import diagnose
from svdray.reward.rewards import (
    ConditioningFidelity,
    LearnedScorer,
    MotionTarget,
    RewardSet,
    TemporalSmoothness,
    to_input_range,
)
from svdray.reward.train import build_reward_set
from tests.support.rewards import ConstantReward, NoGradScorer, Uint8Scorer, ZeroReward


def test_builtin_rewards_on_their_declared_range():
    t = torch.linspace(0, 1, 8).view(1, 8, 1, 1, 1)
    steady = (0.2 + 0.5 * t).expand(2, 8, 3, 4, 4)  # linear brightening: motion without flicker
    flicker = steady.clone()
    flicker[:, 1::2] = 1.0 - flicker[:, 1::2]
    image = steady[:, 0]
    for reward in (ConditioningFidelity(), TemporalSmoothness(), MotionTarget(0.05)):
        assert reward.input_range == (0.0, 1.0)
    assert torch.all(ConditioningFidelity(1)(steady, image) == 0)
    assert torch.allclose(TemporalSmoothness()(steady, image), torch.zeros(2), atol=1e-10)
    assert torch.all(TemporalSmoothness()(flicker, image) < -0.1)
    motion = MotionTarget(target=0.5 / 7)
    assert torch.allclose(motion(steady, image), torch.zeros(2), atol=1e-8)
    assert torch.all(motion(steady[:, :1].expand(-1, 8, -1, -1, -1), image) == -1.0)  # a frozen video
    # Decoded frames in [-1, 1] reach each reward in its own range.
    assert to_input_range(torch.tensor([-1.0, 0.0, 1.0]), (0.0, 1.0)).tolist() == [0.0, 0.5, 1.0]
    assert to_input_range(torch.tensor([-1.5, 1.2]), (0.0, 255.0)).tolist() == [0.0, 255.0]


def test_learned_scorer_plugin_loads_from_folder_and_passes_gradients(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import save_file

    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_pipeline_dir, subfolder="image_encoder")
    clip.save_pretrained(tmp_path / "scorer" / "clip")
    save_file(
        {"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, str(tmp_path / "scorer" / "head.safetensors")
    )
    (tmp_path / "scorer" / "scorer_config.json").write_text(
        json.dumps(
            {
                "input_range": [0, 1],
                "image_size": 224,
                "mean": [0.48145466, 0.4578275, 0.40821073],
                "std": [0.26862954, 0.26130258, 0.27577711],
                "frames": "all",
            }
        )
    )
    reward = build_reward_set(
        load_config_tree({"kind": "learned", "options": {"path": str(tmp_path / "scorer")}})
    )
    frames = torch.rand(2, 3, 3, 32, 32, requires_grad=True)
    total, parts = reward(frames * 2 - 1, frames[:, 0] * 2 - 1)
    total.sum().backward()
    assert parts["learned"].shape == (2,) and frames.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    with pytest.raises(FileNotFoundError, match="scorer_config.json"):
        LearnedScorer(tmp_path)


def load_config_tree(*components):
    from svdray.config import config_from_dict

    return config_from_dict({"reward": {"components": list(components)}}, check_files=False).reward


@pytest.fixture(scope="module")
def sampled(tiny_pipeline_dir):
    """LoRA-adapted tiny UNet and one batch of frames sampled with the graph kept to the LoRA."""
    from svdray.config import config_from_dict

    cfg = config_from_dict(
        {
            "model": {"pretrained": str(tiny_pipeline_dir)},
            "lora": {"rank": 4, "alpha": 4},
            "data": {"num_frames": 8, "height": 32, "width": 32},
            "reward": {"sample_steps": 3, "grad_steps": 1},
        },
        check_files=False,
    )
    models = SVDFamily().build_models(cfg, torch.device("cpu"))
    frozen, unet = models.frozen, models.denoiser
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    scheduler = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).scheduler.config
    frames = sample_frames(
        unet, frozen, scheduler, images, sampling_spec(cfg, "reward"), torch.Generator().manual_seed(0), 1
    )
    return frames, images, lora_parameters(unet), unet


@pytest.mark.parametrize(
    ("reward", "convert", "cause"),
    [
        (ZeroReward(), True, "is exactly 0.0 for every sample"),
        (ConstantReward(), True, "is constant"),
        (NoGradScorer(), True, "no gradient reaches the LoRA"),
        (Uint8Scorer(), True, "no gradient reaches the LoRA"),
        (MotionTarget(), False, "declares pixels in [0, 1] but received"),
    ],
)
def test_each_failure_mode_is_caught(sampled, reward, convert, cause):
    frames, images, params, _ = sampled
    stats = diagnose(RewardSet([("r", reward, 1.0)], convert_inputs=convert), frames, images, params)
    assert any(cause in p for p in stats[0].problems()), stats[0].problems()


def test_healthy_rewards_pass_and_only_lora_changes(sampled, tiny_pipeline_dir):
    frames, images, params, unet = sampled
    rewards = RewardSet(
        [
            ("motion", MotionTarget(), 1.0),
            ("smoothness", TemporalSmoothness(), 0.5),
            ("fidelity", ConditioningFidelity(), 0.5),
        ]
    )
    stats = diagnose(rewards, frames, images, params)
    assert [s.problems() for s in stats] == [[], [], []]
    assert all(s.grad_norm > 0 and s.std > 0 for s in stats)

    frozen_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    total, _ = rewards(frames, images)
    (-total.mean()).backward()
    optimizer.step()
    for name, param in unet.named_parameters():
        if "lora_" in name:
            continue
        assert param.grad is None and torch.equal(param, frozen_before[name]), name
    changed = [n for n, p in unet.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)


def test_reward_check_cli_refuses_with_the_cause(tmp_path, write_config, one_clip_manifest, capsys):
    path = write_config(
        one_clip_manifest,
        reward={"components": [{"kind": "tests.support.rewards:ZeroReward"}], "sample_steps": 2},
    )
    assert cli.main(["reward-check", "--config", str(path), "--report", str(tmp_path / "report.json")]) == 1
    assert "exactly 0.0 for every sample" in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rewards"][0]["zero_fraction"] == 1.0 and report["problems"]


def reward_config(tmp_path, family: str, **sections):
    from svdray.config import config_from_dict

    tree = {
        "model": {"family": family, "pretrained": str(tmp_path / "pipeline")},
        "data": {"num_frames": 9, "height": 32, "width": 32},
        "reward": {"sample_steps": 3},
        **sections,
    }
    return config_from_dict(tree, check_files=False)


@pytest.mark.parametrize(
    ("family", "sections", "described"),
    [
        # Wan's reward sampler has no prompts: the empty prompt and no guidance, whatever
        # wan.sample.guidance_scale says (tests/unit/test_wan_family.py: the pipeline's loop).
        ("wan", {"wan": {"sample": {"guidance_scale": 5.0}}}, "empty prompt, no guidance, shift=scheduler's"),
        ("wan", {"wan": {"shift": 3.0}}, "empty prompt, no guidance, shift=3"),
        # SVD's: still images (a computed bucket falls back to 127), guidance ramped over the
        # frames, `svd.reward` over `svd.sample` (tests/unit/test_sampling.py: the pipeline's loop).
        (
            "svd",
            {"svd": {"motion_bucket_id": None, "reward": {"noise_aug_strength": 0.05}}},
            "fps=7 motion_bucket_id=127 noise_aug_strength=0.05, guidance 1->3 over the frames",
        ),
        (
            "svd",
            {"svd": {"reward": {"max_guidance": 1.0}}},
            "fps=7 motion_bucket_id=127 noise_aug_strength=0.02, no guidance",
        ),
    ],
)
def test_reward_sampling_is_described_as_the_sampler_runs(tmp_path, family, sections, described):
    from svdray.models import family_of

    cfg = reward_config(tmp_path, family, **sections)
    model_family = family_of(cfg)
    assert model_family.describe_reward_sampling(model_family.sampling_spec(cfg, "reward")) == described


def test_reward_stage_logs_and_tags_its_sampling(tmp_path, caplog):
    import logging

    from mlflow.tracking import MlflowClient

    from svdray.reward.train import log_reward_sampling

    cfg = reward_config(tmp_path, "wan", wan={"sample": {"guidance_scale": 5.0}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("reward")).info.run_id
    with caplog.at_level(logging.INFO, logger="svdray"):
        log_reward_sampling(cfg, uri, run_id)
    expected = "empty prompt, no guidance, shift=scheduler's, 3 steps"
    assert client.get_run(run_id).data.tags["svdray.sample_conditioning"] == expected
    assert f"reward samples: {expected}" in caplog.text
