"""Wan image-to-video: loading, conditioning and the rectified-flow objective its sampler assumes.

One diffusers class, `WanImageToVideoPipeline`, covers three layouts:

- "i2v"  Wan2.1-I2V-14B: a CLIP image encoder, the 16-channel VAE; the transformer sees
         [noisy latents | 4 mask channels | latent of (image, zeros...)] (36 channels).
- "ti2v" Wan2.2-TI2V-5B (`expand_timesteps`): no image encoder, the 48-channel VAE; latent
         frame 0 is replaced by the clean image latent and its per-token timestep is 0.
- "a14b" Wan2.2-I2V-A14B: the "i2v" input without an image encoder, and two experts,
         `transformer` for timesteps >= boundary_ratio * 1000 and `transformer_2` below.

The objective (rectified flow, as `FlowMatchEulerDiscreteScheduler` integrates it), with clean
normalised latents x0, noise eps and sigma in [0, 1]:
    noisy  = (1 - sigma) * x0 + sigma * eps
    target = eps - x0                           (the velocity; the scheduler steps x += (s' - s) v)
    t      = sigma * num_train_timesteps        (what the pipeline passes as `timestep`; the
                                                UniPC scheduler the checkpoints ship truncates
                                                it to an integer, less than one step away)
Sigmas are drawn from a density over u in [0, 1] (uniform or logit-normal) and then shifted as
the scheduler shifts its grid, sigma = k u / (1 + (k - 1) u). Everything here is a pure function of
its inputs; tests/test_wan.py compares it with the real pipeline's transformer inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import peft
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from svdray.models.base import LatentDistribution

Layout = Literal["i2v", "ti2v", "a14b"]
LAYOUTS: tuple[str, ...] = ("i2v", "ti2v", "a14b")
Density = Literal["uniform", "logit_normal"]
DENSITIES: tuple[str, ...] = ("uniform", "logit_normal")
EXPERTS: tuple[str, ...] = ("transformer", "transformer_2")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The pipeline's own default for `max_sequence_length`. The transformer attends to every one of
# these tokens (zero padding included, there is no attention mask), so training must pad to the
# same length the sampler uses.
MAX_SEQUENCE_LENGTH = 512

# Mask channels the "i2v"/"a14b" transformer input carries: one per frame of the first temporal
# group of the VAE (its temporal compression).
_MASK_CHANNELS = 4

# Scheduler shifts of the real checkpoints (sample_shift in Wan's configs, e.g.
# Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: 5.0; Wan2.1 I2V 480P ships flow_shift 3.0).
_TINY_SHIFT = {"i2v": 3.0, "ti2v": 5.0, "a14b": 5.0}
# Wan2.2-I2V-A14B's switch between experts (wan/configs/wan_i2v_A14B.py: boundary = 0.900).
_A14B_BOUNDARY_RATIO = 0.9

# Full-size transformer configs (for meta-device FLOP counts and the name-mapping tests).
# Sources: diffusers' scripts/convert_wan_to_diffusers.py ("Wan-I2V-14B-480p": image_dim 1280,
# added_kv_proj_dim 5120, in_channels 36, 40 heads x 128, 40 layers, ffn 13824) and Wan's own
# configs (Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: dim 3072, 24 heads, 30 layers, ffn 14336,
# 48 latent channels, no CLIP; wan_i2v_A14B.py: the 14B shape without CLIP, per expert).
_FULL_SIZE_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
FULL_SIZE_TRANSFORMERS: dict[str, dict] = {
    "Wan2.1-I2V-14B": dict(
        _FULL_SIZE_COMMON,
        num_attention_heads=40,
        num_layers=40,
        ffn_dim=13824,
        in_channels=36,
        out_channels=16,
        image_dim=1280,
        added_kv_proj_dim=5120,
    ),
    "Wan2.2-TI2V-5B": dict(
        _FULL_SIZE_COMMON,
        num_attention_heads=24,
        num_layers=30,
        ffn_dim=14336,
        in_channels=48,
        out_channels=48,
    ),
    "Wan2.2-I2V-A14B": dict(
        _FULL_SIZE_COMMON,
        num_attention_heads=40,
        num_layers=40,
        ffn_dim=13824,
        in_channels=36,
        out_channels=16,
    ),
}


def meta_transformer(name: str) -> WanTransformer3DModel:
    """A full-size transformer with no storage (meta device): names, shapes and FLOPs only."""
    if name not in FULL_SIZE_TRANSFORMERS:
        raise ValueError(f"{name!r} is not one of {sorted(FULL_SIZE_TRANSFORMERS)}")
    with torch.device("meta"):
        return WanTransformer3DModel(**FULL_SIZE_TRANSFORMERS[name])


_TOKENIZER_CORPUS = [
    "a cat walks on the grass in the sun",
    "a dog runs along a beach at sunset, waves in the background",
    "the camera pans slowly over a city at night with bright lights",
    "a red car drives down an empty road between green hills",
    "an astronaut floats in space above the blue earth",
]


# --------------------------------------------------------------------------- pipelines


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained here (no hub download), T5-style: '</s>' appended, '<pad>' = 0."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        _TOKENIZER_CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    )
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def _tiny_transformer(in_channels: int, out_channels: int, image_dim: int | None) -> WanTransformer3DModel:
    heads, head_dim = 2, 12  # head_dim splits into 3 rotary parts (t, h, w) of 4
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,
        rope_max_seq_len=32,
    )


def _tiny_vae(layout: str) -> AutoencoderKLWan:
    if layout == "ti2v":
        # Wan2.2's VAE: 48 channels, residual blocks, a 2x2 pixel patchify on top of three
        # spatial downsamplings, so 16x spatial and 4x temporal compression.
        generator = torch.Generator().manual_seed(1234)
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=(torch.randn(48, generator=generator) * 0.5).tolist(),
            latents_std=(torch.rand(48, generator=generator) + 0.5).tolist(),
        )
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def build_tiny_wan_pipeline(layout: Layout = "i2v", seed: int = 0) -> WanImageToVideoPipeline:
    """A randomly initialised `WanImageToVideoPipeline` of one layout, from the real classes.

    Two transformer layers of width 24, a small Wan VAE (16 channels, or 48 for "ti2v"), a
    2-layer UMT5 and, for "i2v" only, a 2-layer CLIP vision tower (Wan2.2-I2V-A14B has no image
    encoder). The scheduler is `FlowMatchEulerDiscreteScheduler` with the layout's shift. Same
    seed, same weights; the global RNG is left as it was.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"model.layout: {layout!r} is not one of {LAYOUTS}")
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = _tiny_vae(layout)
        z = vae.config.z_dim
        tokenizer = _tiny_tokenizer()
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        image_encoder = image_processor = None
        if layout == "i2v":
            image_encoder = CLIPVisionModel(
                CLIPVisionConfig(
                    hidden_size=16,
                    num_hidden_layers=3,
                    num_attention_heads=2,
                    intermediate_size=32,
                    image_size=32,
                    patch_size=8,
                )
            )
            image_processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
        if layout == "ti2v":
            transformer = _tiny_transformer(z, z, image_dim=None)
        else:
            image_dim = image_encoder.config.hidden_size if image_encoder is not None else None
            transformer = _tiny_transformer(2 * z + _MASK_CHANNELS, z, image_dim=image_dim)
        transformer_2 = None
        if layout == "a14b":
            transformer_2 = _tiny_transformer(2 * z + _MASK_CHANNELS, z, image_dim=None)
    finally:
        torch.random.set_rng_state(rng_state)
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=_TINY_SHIFT[layout]),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=_A14B_BOUNDARY_RATIO if layout == "a14b" else None,
        expand_timesteps=layout == "ti2v",
    )


def save_tiny_wan_pipeline(out_dir: str | Path, layout: Layout = "i2v", seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    build_tiny_wan_pipeline(layout, seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_wan_pipeline(
    pretrained: str | Path,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
) -> WanImageToVideoPipeline:
    """Load a Wan image-to-video pipeline (local folder or hub id, safetensors only).

    The VAE and the CLIP image encoder stay in float32 whatever `dtype` is, as Wan's own code
    runs them: the conditioning latent is the one input the model cannot correct for.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    dtypes = {"default": DTYPES[dtype], "vae": torch.float32, "image_encoder": torch.float32}
    return WanImageToVideoPipeline.from_pretrained(
        str(pretrained), dtype=dtypes, variant=variant, revision=revision, use_safetensors=True
    )


def wan_layout(pipe: WanImageToVideoPipeline) -> Layout:
    if pipe.config.expand_timesteps:
        return "ti2v"
    if pipe.config.boundary_ratio is not None:
        return "a14b"
    return "i2v"


# --------------------------------------------------------------------------- shapes


def check_num_frames(num_frames: int, key: str = "data.num_frames", temporal_compression: int = 4) -> None:
    """Wan's VAE compresses time 4x after the first frame: clips have 4k + 1 frames."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression != 0:
        k = max((num_frames - 1) // temporal_compression, 0)
        raise ValueError(
            f"{key}: {num_frames} frames; Wan clips have {temporal_compression}k + 1 frames "
            f"(e.g. {temporal_compression * k + 1} or {temporal_compression * (k + 1) + 1})"
        )


def num_latent_frames(num_frames: int, temporal_compression: int = 4) -> int:
    check_num_frames(num_frames, temporal_compression=temporal_compression)
    return (num_frames - 1) // temporal_compression + 1


# --------------------------------------------------------------------------- latents


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """(z - latents_mean) / latents_std per channel, in float32: the space the transformer works in."""
    mean, std = _latent_stats(vae, latents)
    return (latents.float() - mean) / std


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, video: torch.Tensor) -> LatentDistribution:
    """Normalised VAE posterior of clips, (B, F, 3, H, W) in [-1, 1] -> mean/std of (B, C, T, h, w).

    The posterior is Gaussian and normalisation is affine, so the normalised posterior has mean
    (mu - m) / s and std sigma / s: the cache stores it and a fresh latent is drawn every step.
    Clips go through the VAE one at a time to bound activation memory at full size.
    """
    _, std_norm = _latent_stats(vae, video)
    means, stds = [], []
    for clip in video:
        dist = vae.encode(clip.permute(1, 0, 2, 3).unsqueeze(0).to(vae.dtype)).latent_dist
        means.append(normalize_latents(vae, dist.mean))
        stds.append(dist.std.float() / std_norm)
    return LatentDistribution(torch.cat(means), torch.cat(stds))


# --------------------------------------------------------------------------- conditioning


@dataclass
class WanConditioning:
    """Everything the transformer receives besides the noisy latents and the timestep.

    prompt_embeds: (B, L, D) UMT5 states, zero-padded to L tokens as the pipeline pads them.
    image_embeds:  (B, N, D_img) CLIP penultimate states ("i2v" only), else None.
    condition:     "i2v"/"a14b": (B, 4 + C, T, h, w), mask channels then the normalised latent
                   of (image, zeros...); "ti2v": (B, C, 1, h, w), the image's normalised latent.
    """

    prompt_embeds: torch.Tensor
    image_embeds: torch.Tensor | None
    condition: torch.Tensor


@torch.no_grad()
def encode_prompts(
    pipe: WanImageToVideoPipeline, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH
) -> torch.Tensor:
    """UMT5 embeddings through the pipeline's own text path (cleaning, padding, zeroed tail)."""
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )
    return embeds


def frames_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images (exact for frames decoded from 8-bit video)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


@torch.no_grad()
def encode_clip_images(pipe: WanImageToVideoPipeline, images: torch.Tensor) -> torch.Tensor:
    """CLIP conditioning of Wan2.1 ((B, 3, H, W) in [-1, 1] -> (B, N, D)) via `pipe.encode_image`.

    The images go in as 8-bit PIL images, as a user's image does, so the CLIP processor's resize,
    crop and normalisation are the pipeline's own.
    """
    return pipe.encode_image(frames_to_pil(images), device=images.device)


@torch.no_grad()
def condition_latents(
    vae: AutoencoderKLWan, images: torch.Tensor, num_frames: int, expand_timesteps: bool
) -> torch.Tensor:
    """The image condition, built as `WanImageToVideoPipeline.prepare_latents` builds it.

    images: (B, 3, H, W) in [-1, 1]. For Wan2.1/A14B the VAE encodes the clip
    (image, zeros x (num_frames - 1)) and the 4 mask channels (1 on latent frame 0, 0 after)
    go in front; for TI2V it encodes the image alone. Both use the posterior mode, normalised.
    """
    t_lat = num_latent_frames(num_frames, vae.config.scale_factor_temporal)
    images = images.unsqueeze(2)  # (B, 3, 1, H, W)
    if expand_timesteps:
        clip = images
    else:
        zeros = images.new_zeros(images.shape[0], images.shape[1], num_frames - 1, *images.shape[-2:])
        clip = torch.cat([images, zeros], dim=2)
    latent = normalize_latents(vae, vae.encode(clip.to(vae.dtype)).latent_dist.mode())
    if expand_timesteps:
        return latent
    # One mask channel per frame of a temporal group of the VAE (the pipeline's own layout).
    mask = latent.new_zeros(latent.shape[0], vae.config.scale_factor_temporal, t_lat, *latent.shape[-2:])
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def build_conditioning(
    pipe: WanImageToVideoPipeline,
    video: torch.Tensor,
    prompts: list[str],
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> WanConditioning:
    """Conditioning of a batch of clips (B, F, 3, H, W) in [-1, 1]: frame 0 is the image."""
    check_num_frames(video.shape[1], key="video frames")
    first = video[:, 0]
    image_embeds = None
    if pipe.transformer is not None and pipe.transformer.config.image_dim is not None:
        image_embeds = encode_clip_images(pipe, first)
    return WanConditioning(
        prompt_embeds=encode_prompts(pipe, prompts, max_sequence_length),
        image_embeds=image_embeds,
        condition=condition_latents(pipe.vae, first, video.shape[1], pipe.config.expand_timesteps),
    )


def drop_prompts(
    prompt_embeds: torch.Tensor,
    empty_prompt_embeds: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's prompt by the empty prompt with probability p (for guidance).

    The pipeline's unconditional branch encodes the negative prompt, "" by default, so the
    dropped prompt is the encoded empty string (`encode_prompts(pipe, [""])`), not zeros.
    Returns the embeddings and the keep mask (1 kept, 0 dropped).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"train.prompt_dropout: {p} is not a probability")
    keep = (torch.rand(prompt_embeds.shape[0], generator=generator, device=prompt_embeds.device) >= p).float()
    mixed = torch.where(
        keep.view(-1, 1, 1).bool(),
        prompt_embeds,
        empty_prompt_embeds.to(prompt_embeds).expand_as(prompt_embeds),
    )
    return mixed, keep


# --------------------------------------------------------------------------- timesteps


def scheduler_shift(scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler) -> float:
    """The static shift of a flow scheduler (FlowMatchEuler's `shift`, UniPC's `flow_shift`)."""
    config = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if config.use_dynamic_shifting or config.shift_terminal is not None:
            raise ValueError("scheduler: dynamic shifting / shift_terminal are not the static shift Wan uses")
        return float(config.shift)
    if isinstance(scheduler, UniPCMultistepScheduler) and config.use_flow_sigmas:
        return float(config.flow_shift)
    raise ValueError(f"scheduler: {type(scheduler).__name__} is not a flow-matching scheduler")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = k u / (1 + (k - 1) u): the schedulers' shift of their sigma grid."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return sigma / (shift - (shift - 1.0) * sigma)


def expert_sigma_range(boundary_ratio: float | None, expert: str | None) -> tuple[float, float]:
    """Sigmas one expert denoises: `transformer` >= boundary_ratio, `transformer_2` below.

    The pipeline switches on t >= boundary_ratio * num_train_timesteps with t = sigma *
    num_train_timesteps, so the split is at sigma = boundary_ratio.
    """
    if boundary_ratio is None:
        if expert not in (None, "transformer"):
            raise ValueError(f"model.expert: {expert!r} given but the pipeline has one transformer")
        return 0.0, 1.0
    if expert not in EXPERTS:
        raise ValueError(f"model.expert: {expert!r} must be one of {EXPERTS} for a two-expert pipeline")
    return (boundary_ratio, 1.0) if expert == "transformer" else (0.0, boundary_ratio)


def expert_for_sigma(boundary_ratio: float | None, sigma: float) -> str:
    """The expert the pipeline runs at this sigma (always `transformer` without a boundary)."""
    if boundary_ratio is None or sigma >= boundary_ratio:
        return "transformer"
    return "transformer_2"


def sigmas_from_quantiles(
    r: torch.Tensor,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Map r in [0, 1) to training sigmas by the inverse CDF of the shifted density on a range.

    u follows the density (uniform, or sigmoid of N(logit_mean, logit_std^2)); sigma =
    shift_sigmas(u). Restricting sigma to [lo, hi] is restricting u to the unshifted bounds, so
    r is mapped into that slice of u's CDF: the exact conditional density, no rejection loop.
    """
    if density not in DENSITIES:
        raise ValueError(f"train.timestep_density: {density!r} is not one of {DENSITIES}")
    lo, hi = (unshift_sigmas(torch.tensor(b, dtype=torch.float64), shift) for b in sigma_range)
    r = r.double()
    if density == "uniform":
        u = lo + r * (hi - lo)
    else:
        cdf_lo, cdf_hi = (torch.special.ndtr((torch.logit(b) - logit_mean) / logit_std) for b in (lo, hi))
        z = torch.special.ndtri(cdf_lo + r * (cdf_hi - cdf_lo))
        u = torch.sigmoid(logit_mean + logit_std * z)
    return shift_sigmas(u, shift).float()


def sample_sigmas(
    batch: int,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One training sigma per sample (see `sigmas_from_quantiles`)."""
    r = torch.rand(batch, generator=generator, dtype=torch.float64)
    return sigmas_from_quantiles(r, density, shift, logit_mean, logit_std, sigma_range).to(device)


def grid_sigmas(
    n: int,
    density: Density = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """n fixed sigmas at the density's mid-quantiles (i + 1/2) / n: a validation loss without noise in t."""
    r = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return sigmas_from_quantiles(r, density, shift, logit_mean, logit_std, sigma_range)


# --------------------------------------------------------------------------- objective


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.float().view(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = _per_sample(sigmas, x0)
    return (1.0 - s) * x0.float() + s * noise.float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise.float() - x0.float()


def first_frame_token_mask(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(seq,) float: 0 for tokens of latent frame 0, 1 after, in the transformer's token order."""
    t, h, w = latent_shape[-3:]
    p_t, p_h, p_w = patch_size
    mask = torch.ones(t // p_t, h // p_h, w // p_w)
    mask[0] = 0.0
    return mask.flatten()


def transformer_inputs(
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    cond: WanConditioning,
    expand_timesteps: bool,
    patch_size: tuple[int, int, int],
    num_train_timesteps: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor | None]:
    """The transformer's keyword inputs, as the pipeline's denoising loop builds them.

    "i2v"/"a14b": hidden_states = [noisy | condition] on channels, timestep (B,).
    "ti2v": latent frame 0 replaced by the clean image latent, timestep (B, seq) with 0 on
    frame 0's tokens. Tensors are cast to the transformer's dtype as the pipeline casts them;
    the timestep stays float32.
    """
    t = sigmas.float().to(noisy.device) * num_train_timesteps
    if expand_timesteps:
        frame_mask = torch.ones_like(noisy[:1, :1])
        frame_mask[:, :, 0] = 0.0
        hidden = (1.0 - frame_mask) * cond.condition.float() + frame_mask * noisy
        token_mask = first_frame_token_mask(noisy.shape, patch_size).to(noisy.device)
        timestep = token_mask.unsqueeze(0) * t.unsqueeze(1)
    else:
        hidden = torch.cat([noisy, cond.condition.float()], dim=1)
        timestep = t
    image = cond.image_embeds.to(dtype) if cond.image_embeds is not None else None
    return {
        "hidden_states": hidden.to(dtype),
        "timestep": timestep,
        "encoder_hidden_states": cond.prompt_embeds.to(dtype),
        "encoder_hidden_states_image": image,
    }


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, expand_timesteps: bool) -> torch.Tensor:
    """Per-sample MSE in float32. TI2V leaves latent frame 0 out: its input is the clean image at
    timestep 0 and the sampler overwrites whatever the model predicts there."""
    err = (pred.float() - target.float()) ** 2
    if expand_timesteps:
        err = err[:, :, 1:]
    return err.flatten(1).mean(dim=1)


def training_loss(
    transformer: WanTransformer3DModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: WanConditioning,
    expand_timesteps: bool,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Per-sample rectified-flow loss of one expert for clean latents x0, noise and sigmas."""
    inputs = transformer_inputs(
        noisy_latents(x0, noise, sigmas),
        sigmas,
        cond,
        expand_timesteps,
        tuple(transformer.config.patch_size),
        num_train_timesteps,
        transformer.dtype,
    )
    pred = transformer(**inputs, return_dict=False)[0]
    return flow_matching_loss(pred, velocity_target(x0, noise), expand_timesteps)


# --------------------------------------------------------------------------- LoRA

_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_IMAGE_PROJECTIONS = ("add_k_proj", "add_v_proj")  # Wan2.1's cross-attention to CLIP tokens
_FFN_PROJECTIONS = ("ffn.net.0.proj", "ffn.net.2")


def lora_target_modules(feed_forward: bool = False) -> str:
    """A full-match regex over `WanTransformer3DModel` module names: every block's self- and
    cross-attention projections (and the image key/value projections where they exist), plus
    the FFN's two linears when `feed_forward`. Embedders and the output head stay frozen."""
    attn = "|".join(_ATTENTION_PROJECTIONS + _IMAGE_PROJECTIONS).replace(".", r"\.")
    parts = [rf"attn[12]\.({attn})"]
    if feed_forward:
        parts.append("|".join(_FFN_PROJECTIONS).replace(".", r"\."))
    return rf"blocks\.\d+\.({'|'.join(parts)})"


def add_wan_lora(
    transformer: WanTransformer3DModel,
    rank: int,
    alpha: float,
    feed_forward: bool = False,
    dropout: float = 0.0,
) -> peft.LoraConfig:
    """Freeze the transformer and add a LoRA adapter ("default") through diffusers' PEFT mixin."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(feed_forward),
        init_lora_weights="gaussian",
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError(f"lora: no module of the transformer matches {config.target_modules!r}")
    return config


def wan_lora_state_dict(transformer: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    """peft's adapter weights, keys `blocks.<i>...lora_A/B.weight`, contiguous CPU float32."""
    state = peft.get_peft_model_state_dict(transformer)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_wan_lora(transformer: WanTransformer3DModel, out_dir: str | Path) -> Path:
    """Write the LoRA folder `pipe.load_lora_weights(out_dir)` reads.

    `WanImageToVideoPipeline.save_lora_weights` format: pytorch_lora_weights.safetensors with
    `transformer.`-prefixed peft keys and the adapter's LoraConfig in the metadata (so alpha and
    rank come back). A LoRA of A14B's low-noise expert loads with
    `pipe.load_lora_weights(out_dir, load_into_transformer_2=True)`.
    """
    out_dir = Path(out_dir)
    config = transformer.peft_config["default"]
    WanImageToVideoPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=wan_lora_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return out_dir
