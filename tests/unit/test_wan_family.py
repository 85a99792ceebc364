"""`WanFamily` behind the model-family interface, on the tiny Wan pipelines (no Ray).

The loss is fed a batch exactly as the data layer delivers it (uint8 clips and images, fps,
motion, bucket, prompts as strings); a hook on the real pipeline's transformer compares what
training feeds it with what `WanImageToVideoPipeline.__call__` feeds it for the same image,
prompt, size and frame count; the sampler is the real pipeline with the LoRA; `save_lora` is a
folder vanilla `load_lora_weights` reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from PIL import Image

from svdray import cli
from svdray.config import ConfigError, config_from_dict
from svdray.models import get_family
from svdray.models.wan import objective
from svdray.models.wan.pipeline import LAYOUTS, save_tiny_wan_pipeline

NUM_FRAMES = 9  # 3 latent frames
SIZE = (32, 64)  # (H, W): non-square; multiples of 32 for TI2V's 16x VAE and 2x2 patches
PROMPTS = ["a red car drives down an empty road", "a cat walks on the grass"]


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-wan-family")
    return {layout: save_tiny_wan_pipeline(root / layout, layout, seed=0) for layout in LAYOUTS}


def wan_config(pretrained, **sections):
    tree = {
        "model": {"family": "wan", "pretrained": str(pretrained)},
        "data": {"num_frames": NUM_FRAMES, "height": SIZE[0], "width": SIZE[1]},
        "lora": {"rank": 4, "alpha": 4},
        "sample": {"steps": 2},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config_from_dict(tree, check_files=False)


def data_batch(seed: int = 0, size: int = 2) -> dict:
    """A batch as `svdray.train.loop.batches` hands it over (the data layer's columns)."""
    rng = np.random.default_rng(seed)
    video = torch.from_numpy(rng.integers(0, 256, (size, NUM_FRAMES, 3, *SIZE), dtype=np.uint8))
    return {
        "video": video,
        "image": video[:, 0].clone(),
        "fps": torch.full((size,), 16.0),
        "motion": torch.full((size,), 3.0, dtype=torch.float64),
        "motion_bucket_id": torch.full((size,), -1.0),
        "prompt": PROMPTS[:size],
    }


def record_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    def pre(_, args, kwargs):
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def pipeline_call(pipe, image: torch.Tensor, prompt: str, latents: torch.Tensor) -> dict:
    """The real pipeline's first (conditional) transformer call for this image and prompt."""
    calls = []
    handle = record_calls(pipe.transformer, calls)
    try:
        pipe(
            image=Image.fromarray(image.permute(1, 2, 0).numpy()),
            prompt=prompt,
            height=SIZE[0],
            width=SIZE[1],
            num_frames=NUM_FRAMES,
            num_inference_steps=1,
            guidance_scale=2.0,
            latents=latents,
            output_type="latent",
        )
    finally:
        handle.remove()
    return {"conditional": calls[0], "unconditional": calls[1]}


def normalised_posterior(vae, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of uint8 clips (B, T, 3, H, W), normalised with the VAE config's stats
    (written out here, independently of the family's code)."""
    pixels = video.float() / 127.5 - 1.0
    dist = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return (dist.mean - mean) / std, dist.std / std


@pytest.mark.parametrize("layout", ["i2v", "ti2v", "a14b"])
def test_training_loss_feeds_the_pipelines_transformer_inputs(wan_dirs, layout):
    expert = "transformer_2" if layout == "a14b" else None
    cfg = wan_config(wan_dirs[layout], wan={"prompt_dropout": 0.0, "expert": expert})
    family = get_family("wan")
    models = family.build_models(cfg, torch.device("cpu"))
    pipe = models.frozen.pipe
    assert models.denoiser is getattr(pipe, expert or "transformer")
    if layout == "a14b":  # the other expert is not held while training
        assert pipe.transformer is None
    batch = data_batch()

    calls = []
    handle = record_calls(models.denoiser, calls)
    generator = torch.Generator().manual_seed(7)
    replay = torch.Generator().set_state(generator.get_state())
    try:
        loss = family.training_loss(models.denoiser, models.frozen, batch, cfg, generator)
    finally:
        handle.remove()
    assert loss.ndim == 0 and torch.isfinite(loss)
    (mine,) = calls

    # The draws, replayed in training's order: latent, prompt dropout, sigma, noise.
    with torch.no_grad():
        mean, std = normalised_posterior(pipe.vae, batch["video"])
    x0 = mean + std * torch.randn(mean.shape, generator=replay)
    torch.rand(2, generator=replay)
    lo, hi = (0.0, 0.9) if layout == "a14b" else (0.0, 1.0)
    sigmas = objective.sigmas_from_quantiles(
        torch.rand(2, generator=replay, dtype=torch.float64),
        "uniform",
        objective.scheduler_shift(pipe.scheduler),
        sigma_range=(lo, hi),
    )
    noise = torch.randn(x0.shape, generator=replay)
    noisy = (1 - sigmas.view(-1, 1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1, 1) * noise
    assert torch.all((sigmas >= lo) & (sigmas < hi))

    z = pipe.vae.config.z_dim
    for i in range(2):
        # The pipeline's own conditioning of this clip's image and prompt; its latents are
        # this sample's noisy latents.
        vanilla = WanImageToVideoPipeline.from_pretrained(wan_dirs[layout])
        seen = pipeline_call(vanilla, batch["image"][i], PROMPTS[i], noisy[i : i + 1])
        theirs = seen["conditional"]
        torch.testing.assert_close(mine["encoder_hidden_states"][i], theirs["encoder_hidden_states"][0])
        if layout == "i2v":
            torch.testing.assert_close(
                mine["encoder_hidden_states_image"][i], theirs["encoder_hidden_states_image"][0]
            )
        else:
            assert mine["encoder_hidden_states_image"] is None is theirs["encoder_hidden_states_image"]
        hidden, expected = mine["hidden_states"][i], theirs["hidden_states"][0]
        if layout == "ti2v":  # frame 0: the clean image latent, timestep 0 on its tokens
            torch.testing.assert_close(hidden[:, :1], expected[:, :1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hidden[:, 1:], noisy[i, :, 1:], rtol=1e-4, atol=1e-4)
            tokens = mine["timestep"][i].view(NUM_FRAMES // 4 + 1, -1)
            assert torch.all(tokens[0] == 0)
            torch.testing.assert_close(tokens[1:], torch.full_like(tokens[1:], float(sigmas[i]) * 1000))
        else:  # [noisy | mask + image condition], the condition exactly the pipeline's
            torch.testing.assert_close(hidden[:z], noisy[i], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hidden[z:], expected[z:], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine["timestep"][i], sigmas[i].float() * 1000)


def test_prompt_dropout_gives_the_pipelines_unconditional_prompt(wan_dirs):
    cfg = wan_config(wan_dirs["i2v"], wan={"prompt_dropout": 1.0})
    family = get_family("wan")
    models = family.build_models(cfg, torch.device("cpu"))
    batch = data_batch(size=1)
    calls = []
    handle = record_calls(models.denoiser, calls)
    family.training_loss(models.denoiser, models.frozen, batch, cfg, torch.Generator().manual_seed(0))
    handle.remove()
    vanilla = WanImageToVideoPipeline.from_pretrained(wan_dirs["i2v"])
    latents = torch.randn(1, 16, 3, SIZE[0] // 8, SIZE[1] // 8)
    seen = pipeline_call(vanilla, batch["image"][0], PROMPTS[0], latents)
    torch.testing.assert_close(
        calls[0]["encoder_hidden_states"], seen["unconditional"]["encoder_hidden_states"]
    )
    assert not torch.equal(calls[0]["encoder_hidden_states"], seen["conditional"]["encoder_hidden_states"])


def test_validation_loss_is_fixed_and_ignores_dropout(wan_dirs):
    family = get_family("wan")
    cfg = wan_config(wan_dirs["ti2v"], wan={"prompt_dropout": 0.0})
    models = family.build_models(cfg, torch.device("cpu"))
    batch = data_batch()
    first = family.validation_loss(models.denoiser, models.frozen, batch, cfg, seed=3)
    assert first == family.validation_loss(models.denoiser, models.frozen, batch, cfg, seed=3)
    assert first != family.validation_loss(models.denoiser, models.frozen, batch, cfg, seed=4)
    dropped = wan_config(wan_dirs["ti2v"], wan={"prompt_dropout": 1.0, "timestep_density": "logit_normal"})
    assert first == family.validation_loss(models.denoiser, models.frozen, batch, dropped, seed=3)


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_validation_grid_stays_in_the_experts_range(wan_dirs, expert):
    """A14B: each expert's validation loss is fed only timesteps the pipeline gives that expert
    (its switch: `transformer` at t >= boundary_ratio * num_train_timesteps), and equals the loss
    of the grid evenly spaced over that range, computed here through diffusers' scheduler (its
    forward process and its Euler step to sigma 0) on the pipeline's own conditioning."""
    family = get_family("wan")
    cfg = wan_config(wan_dirs["a14b"], wan={"expert": expert})
    models = family.build_models(cfg, torch.device("cpu"))
    batch = data_batch()
    calls = []
    handle = record_calls(models.denoiser, calls)
    try:
        loss = family.validation_loss(models.denoiser, models.frozen, batch, cfg, seed=5)
    finally:
        handle.remove()

    vanilla = WanImageToVideoPipeline.from_pretrained(wan_dirs["a14b"])
    num_train_timesteps = vanilla.scheduler.config.num_train_timesteps
    boundary = vanilla.config.boundary_ratio * num_train_timesteps
    seen = torch.stack([call["timestep"] for call in calls])  # (grid points, batch)
    if expert == "transformer":
        assert torch.all((seen >= boundary) & (seen <= num_train_timesteps))
        lo, hi = boundary, num_train_timesteps
    else:
        assert torch.all((seen > 0) & (seen < boundary))
        lo, hi = 0.0, boundary
    points = len(calls)
    assert points > 1 and torch.all(seen == seen[:, :1])  # one timestep per point, the whole batch

    # The pipeline's conditioning of each clip (its first transformer call is `transformer`'s,
    # above the boundary: the condition is the same for both experts).
    z = vanilla.vae.config.z_dim
    latents = torch.zeros(1, z, NUM_FRAMES // 4 + 1, SIZE[0] // 8, SIZE[1] // 8)
    conds = [pipeline_call(vanilla, batch["image"][i], PROMPTS[i], latents)["conditional"] for i in range(2)]
    with torch.no_grad():
        mean, std = normalised_posterior(vanilla.vae, batch["video"])
    replay = torch.Generator().manual_seed(5)  # validation's draws: the latent, then each point's noise
    x0 = mean + std * torch.randn(mean.shape, generator=replay)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(vanilla.scheduler.config, shift=1.0)
    model = getattr(vanilla, expert)
    expected, timesteps = [], []
    for k in range(points):
        sigma = (lo + (k + 0.5) * (hi - lo) / points) / num_train_timesteps  # midpoints of the range
        noise = torch.randn(x0.shape, generator=replay)
        scheduler.set_timesteps(sigmas=[sigma])  # [sigma, 0]
        t = scheduler.timesteps[0]
        timesteps.append(t)
        noisy = scheduler.scale_noise(x0, t.expand(2), noise)
        with torch.no_grad():
            pred = model(
                hidden_states=torch.cat([noisy, torch.stack([c["hidden_states"][0, z:] for c in conds])], 1),
                timestep=t.expand(2),
                encoder_hidden_states=torch.cat([c["encoder_hidden_states"] for c in conds]),
                encoder_hidden_states_image=None,
                return_dict=False,
            )[0]
        x0_estimate = scheduler.step(pred, t, noisy).prev_sample  # noisy + (0 - sigma) * velocity
        # The velocity's squared error is the clean estimate's, over sigma^2.
        expected.append(((x0_estimate - x0) ** 2).flatten(1).mean(1).mean() / scheduler.sigmas[0] ** 2)
    torch.testing.assert_close(seen[:, 0], torch.stack(timesteps))
    # float32: x0 + sigma * v rounds at ~1e-7 of |x0| (a few units), and dividing by the smallest
    # sigma (0.9 / 16 for transformer_2) scales that to ~1e-5 of the loss.
    assert loss == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


def test_bf16_denoiser_keeps_float32_lora_weights(wan_dirs):
    family = get_family("wan")
    cfg = wan_config(
        wan_dirs["i2v"],
        model={"denoiser_dtype": "bfloat16", "frozen_dtype": "bfloat16"},
        train={"mixed_precision": "bf16", "gradient_checkpointing": True},
    )
    models = family.build_models(cfg, torch.device("cpu"))
    lora = [p for p in models.denoiser.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    # Frozen weights in bfloat16 but for the modules diffusers keeps in float32 (time embedding, norms).
    assert models.denoiser.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
    assert models.frozen.pipe.text_encoder.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = family.training_loss(models.denoiser, models.frozen, data_batch(), cfg, torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in lora)


def test_two_expert_pipeline_needs_wan_expert(wan_dirs):
    with pytest.raises(ValueError, match="wan.expert"):
        get_family("wan").build_models(wan_config(wan_dirs["a14b"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="wan.expert"):
        cfg = wan_config(wan_dirs["i2v"], wan={"expert": "transformer_2"})
        get_family("wan").build_models(cfg, torch.device("cpu"))


def test_ti2v_sides_follow_its_vae(wan_dirs):
    cfg = wan_config(wan_dirs["ti2v"], data={"height": 48})  # a multiple of 16, not of 32
    with pytest.raises(ValueError, match="data.height: 48 is not a multiple of 32"):
        get_family("wan").build_models(cfg, torch.device("cpu"))


def trained_lora_dir(family, cfg, tmp_path):
    """A LoRA folder as training leaves it, with visibly non-zero updates."""
    models = family.build_models(cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, p in models.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return models, family.save_lora(models.denoiser, cfg, tmp_path / "lora")


@pytest.mark.parametrize("layout", ["i2v", "a14b"])
def test_sampler_is_the_vanilla_pipeline_with_the_lora(wan_dirs, tmp_path, layout):
    """`svdray sample`'s models (the run's pipeline, its LoRA, the training shift) give what a user
    gets from diffusers alone: `from_pretrained` + `load_lora_weights(lora folder)`."""
    family = get_family("wan")
    expert = "transformer_2" if layout == "a14b" else None
    cfg = wan_config(
        wan_dirs[layout],
        wan={"shift": 2.0, "expert": expert, "sample": {"guidance_scale": 3.0}},
        sample={"steps": 4},
    )
    models, lora_dir = trained_lora_dir(family, cfg, tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    spec = family.sampling_spec(cfg)
    ours = family.sample_video(
        family.load_sampling_models(cfg, lora_dir, "cpu"), image, spec, prompt=PROMPTS[0]
    )
    assert ours.shape == (NUM_FRAMES, *SIZE, 3) and ours.dtype == np.uint8
    # The sampler's view of the models being trained gives the same video.
    during = family.sample_video(family.sampling_models(cfg, models), image, spec, prompt=PROMPTS[0])
    np.testing.assert_array_equal(during, ours)

    vanilla = WanImageToVideoPipeline.from_pretrained(wan_dirs[layout])
    vanilla.scheduler = type(vanilla.scheduler).from_config(vanilla.scheduler.config, shift=2.0)

    def sample(pipe):
        frames = pipe(
            image=Image.fromarray(image),
            prompt=PROMPTS[0],
            height=SIZE[0],
            width=SIZE[1],
            num_frames=NUM_FRAMES,
            num_inference_steps=4,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        ).frames[0]
        return (frames * 255).round().clip(0, 255).astype(np.uint8)

    before = sample(vanilla)
    vanilla.load_lora_weights(lora_dir, **({"load_into_transformer_2": True} if expert else {}))
    after = sample(vanilla)
    assert np.abs(after.astype(int) - before.astype(int)).max() > 2
    np.testing.assert_array_equal(after, ours)


@pytest.mark.parametrize(
    "override,key",
    [
        ({"data": {"num_frames": 8}}, "data.num_frames: 8 frames; Wan clips have 4k \\+ 1"),
        ({"sample": {"num_frames": 12}}, "sample.num_frames"),
        ({"data": {"height": 40}}, "data.height: 40 is not a multiple of 16"),
        ({"lora": {"blocks": ["spatial"]}}, "lora.blocks"),
        ({"lora": {"target_modules": ["to_q"]}}, "lora.target_modules"),
        ({"train": {"gradient_checkpointing": "full"}}, "train.gradient_checkpointing"),
        ({"wan": {"prompt_dropout": 1.5}}, "wan.prompt_dropout"),
        ({"wan": {"shift": 0.0}}, "wan.shift"),
        ({"wan": {"timestep_density": "lognormal"}}, "wan.timestep_density"),
        ({"wan": {"sample": {"guidance_scale": 0.5}}}, "wan.sample.guidance_scale"),
        ({"svd": {"p_mean": 1.0}}, "svd: options of model.family svd"),
    ],
)
def test_wan_config_rules_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        wan_config(tmp_path, **override)


def test_wan_section_belongs_to_wan_runs():
    with pytest.raises(ConfigError, match="wan: options of model.family wan"):
        config_from_dict({"wan": {"prompt_dropout": 0.2}}, check_files=False)


@pytest.mark.parametrize("layout", ["i2v", "ti2v", "a14b"])
def test_reward_sampler_is_the_pipelines_loop(wan_dirs, layout):
    """`sample_frames` (the reward stage's sampler, with a graph) gives the pipeline's own video for
    the same image, empty prompt, noise and shift, without guidance (the reward stage has no
    prompts), with each expert where the pipeline uses it."""
    family = get_family("wan")
    expert = "transformer_2" if layout == "a14b" else None
    cfg = wan_config(wan_dirs[layout], wan={"shift": 4.0, "expert": expert}, reward={"sample_steps": 4})
    models = family.load_sampling_models(cfg, None, "cpu")
    spec = family.sampling_spec(cfg, "reward")
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, *SIZE), dtype=np.uint8))
    frames = family.sample_frames(
        models, image.float() / 127.5 - 1, spec, torch.Generator().manual_seed(3), 0
    )
    assert frames.shape == (1, NUM_FRAMES, 3, *SIZE)

    pipe = WanImageToVideoPipeline.from_pretrained(wan_dirs[layout])
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=4.0)
    s = pipe.vae_scale_factor_spatial
    latents = torch.randn(
        (1, pipe.vae.config.z_dim, 3, SIZE[0] // s, SIZE[1] // s), generator=torch.Generator().manual_seed(3)
    )
    expected = pipe(
        image=Image.fromarray(image[0].permute(1, 2, 0).numpy()),
        prompt="",
        height=SIZE[0],
        width=SIZE[1],
        num_frames=NUM_FRAMES,
        num_inference_steps=4,
        guidance_scale=1.0,
        latents=latents,
        output_type="np",
    ).frames[0]
    torch.testing.assert_close(
        (frames[0].permute(0, 2, 3, 1) + 1) / 2, torch.from_numpy(expected), atol=2e-4, rtol=0
    )
    # What the reward stage logs of this sampler (svdray.reward.train.log_reward_sampling).
    assert family.describe_reward_sampling(spec) == "empty prompt, no guidance, shift=4"


def test_reward_sampler_keeps_a_graph_to_the_lora(wan_dirs):
    family = get_family("wan")
    cfg = wan_config(wan_dirs["ti2v"], reward={"sample_steps": 3})
    models = family.build_models(cfg, torch.device("cpu"))
    images = torch.rand(2, 3, *SIZE) * 2 - 1
    frames = family.sample_frames(
        family.sampling_models(cfg, models), images, family.sampling_spec(cfg, "reward"), torch.Generator(), 1
    )
    frames.square().mean().backward()
    lora_b = [p for n, p in models.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_tiny_model_cli_layouts(tmp_path):
    assert cli.main(["tiny-model", "--family", "wan", "--layout", "ti2v", "--out", str(tmp_path / "t")]) == 0
    config = WanImageToVideoPipeline.load_config(str(tmp_path / "t"))
    assert config["expand_timesteps"] is True and config["image_encoder"] == [None, None]
    assert cli.main(["tiny-model", "--family", "wan", "--layout", "a14b", "--out", str(tmp_path / "a")]) == 0
    assert WanImageToVideoPipeline.load_config(str(tmp_path / "a"))["boundary_ratio"] == 0.9
    with pytest.raises(ValueError, match="--layout"):
        get_family("wan").save_tiny_pipeline(tmp_path / "x", layout="t2v")
    with pytest.raises(ValueError, match="no options"):
        get_family("svd").save_tiny_pipeline(tmp_path / "y", layout="ti2v")


@pytest.mark.parametrize("layout", ["i2v", "ti2v"])
def test_cached_fields_give_the_decoded_batchs_loss(wan_dirs, layout):
    """What the latent cache stores for a clip (`WanFamily.cache_encoder`: latent distribution,
    image condition, prompt and CLIP embeddings), handed back with a batch dimension as cached
    batches carry it, gives the loss and the validation loss of the decoded clip exactly."""
    family = get_family("wan")
    cfg = wan_config(wan_dirs[layout], wan={"prompt_dropout": 0.5})
    spec = family.cache_encoder()
    assert spec.components[:2] == ("vae", "text_encoder") and spec.version and spec.uses_prompts
    encoder = spec.cls(cfg.model)
    assert encoder.pipe.transformer is None  # the cache needs the encoders only
    batch = data_batch()
    stored = encoder.encode(batch["video"], batch["image"], batch["prompt"])
    expected = {"latent_mean", "latent_std", "prompt_embeds", "condition"} | (
        {"image_embeds"} if layout == "i2v" else set()
    )
    assert set(stored) == expected
    assert all(v.dtype == torch.float32 and v.shape[0] == 2 for v in stored.values())
    cached = {k: v for k, v in batch.items() if k != "video"} | stored

    models = family.build_models(cfg, torch.device("cpu"))
    losses = [
        family.training_loss(models.denoiser, models.frozen, b, cfg, torch.Generator().manual_seed(11))
        for b in (batch, cached)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    assert family.validation_loss(models.denoiser, models.frozen, batch, cfg, 2) == pytest.approx(
        family.validation_loss(models.denoiser, models.frozen, cached, cfg, 2), rel=1e-6
    )


def configs_only(pipeline: Path, out: Path) -> Path:
    """A copy of a pipeline folder without its weights: what loads nothing but configs."""
    shutil.copytree(pipeline, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


@pytest.mark.parametrize(
    ("layout", "flag", "value", "message"),
    [
        ("ti2v", "--height", 48, "--height: 48 is not a positive multiple of 32, as model.family wan"),
        ("ti2v", "--width", 80, "--width: 80 is not a positive multiple of 32"),
        ("i2v", "--height", 40, "--height: 40 is not a multiple of 16"),
        ("i2v", "--width", 36, "--width: 36 is not a multiple of 8"),
    ],
)
def test_sample_cli_checks_the_size_by_the_familys_rule_before_loading(
    wan_dirs, tmp_path, capsys, layout, flag, value, message
):
    """Without a run, `svdray sample` checks a size against the pipeline's multiple (its VAE x its
    patch: 32 for TI2V's 16x VAE) before any model loads: the pipeline here has no weights."""
    pipeline = configs_only(wan_dirs[layout], tmp_path / "configs-only")
    image = tmp_path / "still.png"
    Image.fromarray(np.zeros((70, 100, 3), np.uint8)).save(image)
    out = tmp_path / "v.mp4"
    argv = [
        "sample",
        "--family",
        "wan",
        "--pipeline",
        str(pipeline),
        "--image",
        str(image),
        "--out",
        str(out),
    ]
    assert cli.main([*argv, flag, str(value)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sample_cli_rounds_the_images_size_to_the_familys_multiple(wan_dirs, tmp_path):
    from decord import VideoReader

    image = tmp_path / "still.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "v.mp4"
    argv = ["sample", "--family", "wan", "--pipeline", str(wan_dirs["ti2v"]), "--image", str(image)]
    assert cli.main([*argv, "--out", str(out), "--num-frames", "5", "--steps", "1"]) == 0
    frame = VideoReader(str(out))[0].asnumpy()
    assert frame.shape == (64, 96, 3)  # 70x100 rounded down to TI2V's multiples of 32
