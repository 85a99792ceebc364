"""Wan's conditioning and objective against the real `WanImageToVideoPipeline`.

Every layout's tiny pipeline is saved with `save_pretrained` and read back with
`from_pretrained`. Hooks on its transformers record what the sampler feeds them during a real
`pipe(...)` call; the training functions must build the same inputs for the same image, prompt,
noise and timestep, and a perfect velocity must take the scheduler back to the clean latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline
from PIL import Image

from svdray.models.wan import conditioning, objective
from svdray.models.wan import lora as wan_lora
from svdray.models.wan import pipeline as wan_pipeline

torch.set_num_threads(1)

SIZES = {"i2v": (32, 48), "ti2v": (64, 96), "a14b": (32, 48)}  # (H, W), non-square on purpose
NUM_FRAMES = 9  # 3 latent frames: the mask and frame-0 handling differ from the rest
PROMPT = "a red car drives down an empty road"


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-wan")
    return {
        layout: wan_pipeline.save_tiny_wan_pipeline(root / layout, layout, seed=0)
        for layout in wan_pipeline.LAYOUTS
    }


@pytest.fixture(scope="module")
def pipes(wan_dirs):
    return {layout: wan_pipeline.load_wan_pipeline(path) for layout, path in wan_dirs.items()}


def _image(layout: str, seed: int = 0) -> np.ndarray:
    h, w = SIZES[layout]
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(pixels: np.ndarray, num_frames: int = NUM_FRAMES, seed: int = 1) -> torch.Tensor:
    """(1, F, 3, H, W) in [-1, 1] whose frame 0 is `pixels`; later frames are random."""
    rest = np.random.default_rng(seed).integers(0, 256, (num_frames - 1, *pixels.shape), dtype=np.uint8)
    frames = torch.from_numpy(np.concatenate([pixels[None], rest])).permute(0, 3, 1, 2).float()
    return (frames / 127.5 - 1.0).unsqueeze(0)


def _noise(pipe: WanImageToVideoPipeline, layout: str, seed: int = 2) -> torch.Tensor:
    h, w = SIZES[layout]
    s = pipe.vae_scale_factor_spatial
    shape = (1, pipe.vae.config.z_dim, wan_pipeline.num_latent_frames(NUM_FRAMES), h // s, w // s)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run_recorded(pipe, layout, pixels, noise, steps=3, guidance=2.0):
    """Run the real pipeline; return each transformer call's kwargs, output and expert name."""
    calls = []

    def record(name):
        def pre(module, args, kwargs):
            calls.append(
                {"expert": name, **{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}}
            )

        def post(module, args, output):
            calls[-1]["output"] = output[0].detach().clone()

        return pre, post

    handles = []
    for name in wan_pipeline.EXPERTS:
        module = getattr(pipe, name)
        if module is not None:
            pre, post = record(name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
    try:
        h, w = SIZES[layout]
        pipe(
            image=Image.fromarray(pixels),
            prompt=PROMPT,
            height=h,
            width=w,
            num_frames=NUM_FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.clone(),
            output_type="latent",
        )
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _x0_behind(latents: torch.Tensor, noise: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """The clean latents that rectified flow mixes with `noise` at `sigma` into `latents`."""
    if sigma >= 1.0:  # pure noise: any x0 gives the same input
        return torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return (latents - sigma * noise) / (1.0 - sigma)


@pytest.mark.parametrize("layout", wan_pipeline.LAYOUTS)
def test_training_inputs_match_the_pipelines_transformer_calls(pipes, layout):
    pipe = pipes[layout]
    pixels, noise = _image(layout), _noise(pipe, layout)
    calls = _run_recorded(pipe, layout, pixels, noise)
    assert len(calls) == 2 * 3  # conditional and unconditional call per step

    cond = conditioning.build_conditioning(pipe, _video(pixels)[:, 0], NUM_FRAMES, [PROMPT])
    empty = conditioning.encode_prompts(pipe, [""])
    expand = pipe.config.expand_timesteps
    z = pipe.vae.config.z_dim
    sigmas = pipe.scheduler.sigmas
    experts_seen = set()
    for step in range(3):
        conditional, unconditional = calls[2 * step], calls[2 * step + 1]
        sigma = sigmas[step].reshape(1)
        assert conditional["expert"] == objective.expert_for_sigma(pipe.config.boundary_ratio, float(sigma))
        experts_seen.add(conditional["expert"])
        expert = getattr(pipe, conditional["expert"])
        latents = conditional["hidden_states"] if expand else conditional["hidden_states"][:, :z]
        x0 = _x0_behind(latents, noise, float(sigma), seed=step)

        mine = objective.transformer_inputs(
            objective.noisy_latents(x0, noise, sigma),
            sigma,
            cond,
            expand,
            tuple(expert.config.patch_size),
            pipe.scheduler.config.num_train_timesteps,
            expert.dtype,
        )
        torch.testing.assert_close(mine["hidden_states"], conditional["hidden_states"], rtol=1e-4, atol=1e-4)
        assert mine["timestep"].dtype == conditional["timestep"].dtype
        torch.testing.assert_close(mine["timestep"], conditional["timestep"])
        torch.testing.assert_close(mine["encoder_hidden_states"], conditional["encoder_hidden_states"])
        if layout == "i2v":
            torch.testing.assert_close(
                mine["encoder_hidden_states_image"], conditional["encoder_hidden_states_image"]
            )
        else:
            assert mine["encoder_hidden_states_image"] is None
            assert conditional["encoder_hidden_states_image"] is None

        # The guidance branch sees the empty prompt: what prompt dropout trains with.
        dropped, _ = conditioning.drop_prompts(cond.prompt_embeds, empty, p=1.0)
        torch.testing.assert_close(dropped, unconditional["encoder_hidden_states"])

        # The loss of this expert is the MSE between the pipeline's own prediction and eps - x0.
        target = noise - x0
        err = (conditional["output"] - target) ** 2
        expected = (err[:, :, 1:] if expand else err).mean()
        loss = objective.training_loss(expert, x0, noise, sigma, cond, expand)
        torch.testing.assert_close(loss, expected.reshape(1), rtol=1e-4, atol=1e-5)
    if layout == "a14b":
        assert experts_seen == {"transformer", "transformer_2"}


@pytest.mark.parametrize("layout", ["i2v", "ti2v"])
def test_bfloat16_inputs_have_the_pipelines_dtypes(wan_dirs, layout):
    pipe = wan_pipeline.load_wan_pipeline(wan_dirs[layout], dtype="bfloat16")
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.bfloat16
    pixels, noise = _image(layout), _noise(pipe, layout)
    call = _run_recorded(pipe, layout, pixels, noise, steps=1, guidance=1.0)[0]
    cond = conditioning.build_conditioning(pipe, _video(pixels)[:, 0], NUM_FRAMES, [PROMPT])
    sigma = pipe.scheduler.sigmas[:1]
    mine = objective.transformer_inputs(
        objective.noisy_latents(torch.zeros_like(noise), noise, sigma),
        sigma,
        cond,
        pipe.config.expand_timesteps,
        tuple(pipe.transformer.config.patch_size),
        1000,
        pipe.transformer.dtype,
    )
    for key, value in mine.items():
        if value is None:
            assert call[key] is None
            continue
        assert value.dtype == call[key].dtype, key
        torch.testing.assert_close(value.float(), call[key].float(), rtol=2e-2, atol=2e-2)


def _schedulers(pipes):
    yield from (pipe.scheduler for pipe in pipes.values())
    # What the real Wan checkpoints ship: UniPC on flow sigmas.
    yield UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


@pytest.mark.parametrize("steps", [4, 12])
def test_perfect_velocity_takes_the_sampler_to_x0(pipes, steps):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(1, 16, 3, 4, 6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    for template in _schedulers(pipes):
        scheduler = type(template).from_config(template.config)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas
        latents = objective.noisy_latents(x0, noise, sigmas[:1])
        for i, t in enumerate(scheduler.timesteps):
            latents = scheduler.step(objective.velocity_target(x0, noise), t, latents, return_dict=False)[0]
            # Every intermediate state is the training mix at the next sigma.
            torch.testing.assert_close(
                latents, objective.noisy_latents(x0, noise, sigmas[i + 1 : i + 2]), rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


def test_shift_and_timesteps_are_the_schedulers(pipes):
    for template in _schedulers(pipes):
        scheduler = type(template).from_config(template.config)
        scheduler.set_timesteps(10)
        shift = objective.scheduler_shift(scheduler)
        unshifted = objective.unshift_sigmas(scheduler.sigmas[:-1].double(), shift)
        torch.testing.assert_close(objective.shift_sigmas(unshifted, shift).float(), scheduler.sigmas[:-1])
        # The transformer's timestep is sigma * num_train_timesteps; UniPC truncates it to an
        # integer, a difference below one step that training (continuous t) does not copy.
        t = scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps
        if isinstance(scheduler, UniPCMultistepScheduler):
            assert torch.all((t - scheduler.timesteps.float()).abs() < 1.0)
        else:
            torch.testing.assert_close(scheduler.timesteps, t, rtol=1e-6, atol=1e-3)
    assert objective.scheduler_shift(pipes["ti2v"].scheduler) == 5.0
    assert objective.scheduler_shift(pipes["i2v"].scheduler) == 3.0
    with pytest.raises(ValueError, match="dynamic"):
        objective.scheduler_shift(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a.double().numpy()), np.sort(b.double().numpy())
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def _naive_sigmas(n, density, shift, mean, std, sigma_range, seed):
    """The straightforward recipe: draw u, shift it, keep the draws inside the range."""
    g = torch.Generator().manual_seed(seed)
    u = (
        torch.rand(n * 8, generator=g)
        if density == "uniform"
        else torch.sigmoid(mean + std * torch.randn(n * 8, generator=g))
    )
    sigma = shift * u / (1 + (shift - 1) * u)
    lo, hi = sigma_range
    return sigma[(sigma >= lo) & (sigma <= hi)][:n]


@pytest.mark.parametrize(
    "density,shift,mean,std,expert",
    [
        ("uniform", 1.0, 0.0, 1.0, None),
        ("uniform", 5.0, 0.0, 1.0, None),
        ("logit_normal", 1.0, 0.0, 1.0, None),
        ("logit_normal", 3.0, 0.5, 0.8, None),
        ("uniform", 5.0, 0.0, 1.0, "transformer"),
        ("logit_normal", 5.0, -0.3, 1.2, "transformer_2"),
    ],
)
def test_sigma_density(density, shift, mean, std, expert):
    n = 20000
    boundary = 0.9 if expert else None
    sigma_range = objective.expert_sigma_range(boundary, expert)
    g = torch.Generator().manual_seed(0)
    sigmas = objective.sample_sigmas(n, density, shift, mean, std, sigma_range, generator=g)
    assert sigmas.shape == (n,) and sigmas.dtype == torch.float32
    lo, hi = sigma_range
    assert sigmas.min() >= lo and sigmas.max() <= hi
    if expert is not None:
        assert {objective.expert_for_sigma(boundary, float(s)) for s in sigmas[:500]} == {expert}
    reference = _naive_sigmas(n, density, shift, mean, std, sigma_range, seed=1)
    assert len(reference) > 2000
    # Critical value of the two-sample KS test at alpha = 0.001 is about 0.011 / 0.04 here.
    assert _ks(sigmas, reference) < 1.95 * np.sqrt(1 / n + 1 / len(reference))
    # A fixed grid follows the same distribution.
    grid = objective.grid_sigmas(400, density, shift, mean, std, sigma_range)
    assert torch.all(grid[1:] > grid[:-1]) and grid.min() >= lo and grid.max() <= hi
    assert _ks(grid, reference) < 0.05


def test_expert_ranges_follow_the_boundary():
    assert objective.expert_sigma_range(0.9, "transformer") == (0.9, 1.0)
    assert objective.expert_sigma_range(0.9, "transformer_2") == (0.0, 0.9)
    assert objective.expert_sigma_range(None, None) == (0.0, 1.0)
    with pytest.raises(ValueError, match="wan.expert"):
        objective.expert_sigma_range(0.9, None)
    with pytest.raises(ValueError, match="wan.expert"):
        objective.expert_sigma_range(None, "transformer_2")
    with pytest.raises(ValueError, match="wan.timestep_density"):
        objective.sample_sigmas(4, "lognormal")


def test_prompt_dropout_frequency():
    n, p = 20000, 0.3
    embeds = torch.randn(n, 3, 2)
    empty = torch.randn(1, 3, 2)
    mixed, keep = conditioning.drop_prompts(embeds, empty, p, generator=torch.Generator().manual_seed(0))
    dropped = keep == 0
    assert abs(dropped.float().mean().item() - p) < 4 * np.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(mixed[dropped], empty.expand(int(dropped.sum()), -1, -1))
    torch.testing.assert_close(mixed[~dropped], embeds[~dropped])
    assert torch.equal(conditioning.drop_prompts(embeds, empty, 0.0)[0], embeds)
    with pytest.raises(ValueError, match="prompt_dropout"):
        conditioning.drop_prompts(embeds, empty, 1.5)


@pytest.mark.parametrize("layout", ["i2v", "ti2v"])
def test_video_latents_are_normalised_like_the_condition(pipes, layout):
    """Wan's VAE is causal: latent frame 0 encodes frame 0 alone, so a clip's normalised latent
    there equals the pipeline's image condition; and a draw from the cached distribution is a
    normalised draw from the VAE's posterior."""
    pipe = pipes[layout]
    pixels = _image(layout)
    video = _video(pixels)
    dist = conditioning.encode_video(pipe.vae, video)
    condition = conditioning.condition_latents(
        pipe.vae, video[:, 0], NUM_FRAMES, pipe.config.expand_timesteps
    )
    image_latent = condition if layout == "ti2v" else condition[:, 4:, :1]
    torch.testing.assert_close(dist.mean[:, :, :1], image_latent, rtol=1e-4, atol=1e-4)
    assert dist.mean.shape == (
        1,
        pipe.vae.config.z_dim,
        3,
        *[s // pipe.vae_scale_factor_spatial for s in SIZES[layout]],
    )

    raw = pipe.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist
    expected = conditioning.normalize_latents(pipe.vae, raw.sample(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(dist.sample(torch.Generator().manual_seed(3)), expected, rtol=1e-4, atol=1e-4)


def test_i2v_mask_marks_latent_frame_zero(pipes):
    pipe = pipes["i2v"]
    condition = conditioning.condition_latents(pipe.vae, _video(_image("i2v"))[:, 0], NUM_FRAMES, False)
    mask = condition[:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)


def test_ti2v_loss_ignores_frame_zero_and_i2v_does_not():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    changed = pred.clone()
    changed[:, :, 0] += 1.0
    torch.testing.assert_close(
        objective.flow_matching_loss(pred, target, True), objective.flow_matching_loss(changed, target, True)
    )
    assert torch.all(
        objective.flow_matching_loss(changed, target, False)
        != objective.flow_matching_loss(pred, target, False)
    )
    torch.testing.assert_close(
        objective.flow_matching_loss(pred, target, False), ((pred - target) ** 2).flatten(1).mean(1)
    )


@pytest.mark.parametrize(
    "frames,ok", [(1, True), (5, True), (81, True), (121, True), (8, False), (80, False), (0, False)]
)
def test_frame_counts_are_4k_plus_1(frames, ok):
    if ok:
        wan_pipeline.check_num_frames(frames)
    else:
        with pytest.raises(ValueError, match=r"data\.num_frames: .*4k \+ 1"):
            wan_pipeline.check_num_frames(frames)


def test_lora_targets():
    import re

    pattern = re.compile(wan_lora.lora_target_modules(feed_forward=False))
    pattern_ffn = re.compile(wan_lora.lora_target_modules(feed_forward=True))
    pipe = wan_pipeline.build_tiny_wan_pipeline("i2v")
    linear = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = {n for n in linear if pattern.fullmatch(n)}
    chosen_ffn = {n for n in linear if pattern_ffn.fullmatch(n)}
    per_block = {n.split(".", 2)[2] for n in chosen}
    assert per_block == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")} | {
        "attn2.add_k_proj",
        "attn2.add_v_proj",
    }
    assert {n.split(".", 2)[2] for n in chosen_ffn - chosen} == {"ffn.net.0.proj", "ffn.net.2"}
    assert len(chosen) == 2 * 10


@pytest.mark.parametrize("layout,expert", [("i2v", "transformer"), ("a14b", "transformer_2")])
def test_lora_folder_loads_into_a_vanilla_pipeline(wan_dirs, tmp_path, layout, expert):
    def sample(pipe):
        h, w = SIZES[layout]
        return pipe(
            image=Image.fromarray(_image(layout)),
            prompt=PROMPT,
            height=h,
            width=w,
            num_frames=5,
            num_inference_steps=3,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames

    trained = wan_pipeline.load_wan_pipeline(wan_dirs[layout])
    module = getattr(trained, expert)
    wan_lora.add_wan_lora(module, rank=4, alpha=2.0, feed_forward=True)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 for p in trainable)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    reference = sample(trained)
    lora_dir = wan_lora.save_wan_lora(module, tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    vanilla = WanImageToVideoPipeline.from_pretrained(wan_dirs[layout])
    before = sample(vanilla)
    vanilla.load_lora_weights(
        lora_dir, **({"load_into_transformer_2": True} if expert == "transformer_2" else {})
    )
    after = sample(vanilla)
    assert (after - before).abs().max() > 1e-3
    # Same output as the adapter in training: rank and alpha survived the round trip.
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
