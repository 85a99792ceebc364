"""Wan's config section (`wan:`, used with `model.family: wan`) and its rules; imports no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from svdray.config import Config, ConfigError, LoraConfig
from svdray.data.buckets import parse_bucket
from svdray.models import FamilyConfig, SampleFlag

# Wan's VAEs compress time 4x after the first frame (`scale_factor_temporal`).
WAN_TEMPORAL_COMPRESSION = 4
# Wan's transformers patchify 2x2 latent pixels and every Wan VAE downsamples at least 8x, so
# sides are multiples of 16 (Wan2.2-TI2V-5B's 16x VAE needs 32, checked when it loads).
WAN_SIDE_MULTIPLE = 16


@dataclass
class WanSamplingConfig:
    """Wan's sampler settings (after training, validation, `svdray sample`): the real
    image-to-video pipeline of diffusers, conditioned as training was (prompt encoding, image crop, size,
    frame count and shift)."""

    guidance_scale: float = 5.0  # the pipeline's default; 1.0 turns guidance off
    # Two-expert pipelines (Wan2.2-I2V-A14B): the low-noise expert's scale; null: guidance_scale.
    guidance_scale_2: float | None = None
    # The unconditional branch's prompt. Training's prompt dropout trains the empty prompt, so ""
    # (the pipeline's default) is the guidance the LoRA learned.
    negative_prompt: str = ""


@dataclass
class WanConfig:
    """Wan image-to-video's options (`model.family: wan`, svdray/models/wan/): its flow-matching
    objective, prompt dropout, which expert of a two-expert pipeline trains, and sampling."""

    # Two-expert pipelines (Wan2.2-I2V-A14B, which switches at boundary_ratio): the expert to
    # train, "transformer" (high noise, sigma >= boundary) or "transformer_2" (low noise). Required
    # there, and must stay null for one-transformer pipelines (Wan2.1-I2V, Wan2.2-TI2V-5B).
    expert: Literal["transformer", "transformer_2"] | None = None
    # Density of the training timestep before the shift: uniform, or logit-normal (SD3's) with
    # this mean and std of the logit.
    timestep_density: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # The shift k of sigma = k u / (1 + (k - 1) u); null: the pipeline scheduler's own (its
    # `shift` / `flow_shift`). Sampling uses the same value.
    shift: float | None = None
    # Probability that a sample's prompt is replaced by the encoded empty prompt (what the
    # sampler's unconditional branch sees), for classifier-free guidance.
    prompt_dropout: float = 0.1
    # Text tokens the prompt is padded to (the pipeline's default, which sampling uses too: the
    # transformer attends to the padding as well).
    max_sequence_length: int = 512
    # dtype of the VAE (the text and image encoders use model.frozen_dtype). Wan's own code runs
    # its VAE in float32: the conditioning latent is the one input the model cannot correct for.
    vae_dtype: Literal["float32", "bfloat16"] = "float32"
    sample: WanSamplingConfig = field(default_factory=WanSamplingConfig)


def check_wan_num_frames(
    num_frames: int, key: str = "data.num_frames", temporal_compression: int = WAN_TEMPORAL_COMPRESSION
) -> None:
    """Wan's VAE compresses time 4x after the first frame: clips have 4k + 1 frames."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression != 0:
        k = max((num_frames - 1) // temporal_compression, 0)
        raise ConfigError(
            f"{key}: {num_frames} frames; Wan clips have {temporal_compression}k + 1 frames "
            f"(e.g. {temporal_compression * k + 1} or {temporal_compression * (k + 1) + 1})"
        )


def validate_wan(cfg: Config) -> None:
    """Rules of `model.family: wan` (no model is loaded: the layout-dependent ones are checked
    when the pipeline loads, naming the same keys)."""
    w = cfg.wan
    frame_keys = {
        "data.num_frames": cfg.data.num_frames,
        "sample.num_frames": cfg.sample.num_frames,
        "reward.num_frames": cfg.reward.num_frames,
    }
    for key, value in frame_keys.items():
        if value is not None:
            check_wan_num_frames(value, key)
    sides = {"data.height": cfg.data.height, "data.width": cfg.data.width}
    sides |= {f"data.buckets[{i}]": side for i, b in enumerate(cfg.data.buckets) for side in parse_bucket(b)}
    for key, value in sides.items():
        if value % WAN_SIDE_MULTIPLE:
            raise ConfigError(f"{key}: {value} is not a multiple of {WAN_SIDE_MULTIPLE} (Wan's VAE x patch)")
    if not 0.0 <= w.prompt_dropout <= 1.0:
        raise ConfigError(f"wan.prompt_dropout: {w.prompt_dropout} is not a probability")
    if not w.logit_std > 0:
        raise ConfigError(f"wan.logit_std: must be positive, got {w.logit_std}")
    if w.shift is not None and not w.shift > 0:
        raise ConfigError(f"wan.shift: must be positive (or null: the scheduler's), got {w.shift}")
    if w.max_sequence_length <= 0:
        raise ConfigError(f"wan.max_sequence_length: must be positive, got {w.max_sequence_length}")
    for key in ("guidance_scale", "guidance_scale_2"):
        value = getattr(w.sample, key)
        if value is not None and value < 1.0:
            raise ConfigError(f"wan.sample.{key}: must be at least 1 (1: no guidance), got {value}")
    # SVD's UNet options mean nothing to Wan's transformer: set, they would be silently ignored.
    defaults = LoraConfig()
    if cfg.lora.blocks != defaults.blocks:
        raise ConfigError(
            "lora.blocks: SVD's spatial/temporal blocks; Wan adapts every transformer block "
            "(leave lora.blocks unset)"
        )
    if cfg.lora.target_modules != defaults.target_modules:
        raise ConfigError(
            "lora.target_modules: Wan adapts the attention projections of every block (to_q, to_k, "
            "to_v, to_out.0 and, for Wan2.1, add_k_proj/add_v_proj); use lora.feed_forward to add "
            "the FFN, and leave lora.target_modules unset"
        )
    if cfg.train.gradient_checkpointing == "full":
        raise ConfigError(
            "train.gradient_checkpointing: 'full' is SVD's; Wan's transformer checkpoints every "
            "block with true"
        )
    if cfg.speed.attention != "default":
        raise ConfigError(
            "speed.attention: Wan's attention runs through diffusers' own processor, which picks "
            "its kernel itself; leave speed.attention at default"
        )


def check_context_parallel_heads(heads: int, cfg: Config, where: str) -> None:
    """Ulysses hands each worker of a group heads / train.context_parallel of the heads."""
    degree = cfg.train.context_parallel
    if degree > 1 and cfg.train.context_parallel_kind == "ulysses" and heads % degree:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ConfigError(
            f"train.context_parallel: {degree} (Ulysses) must divide the {heads} attention heads of "
            f"{where}; choose one of {divisors}, or train.context_parallel_kind: ring"
        )


def check_context_parallel_tokens(tokens: dict[str, int], cfg: Config) -> None:
    """Each worker of a group takes an equal share of a clip's tokens (`tokens`: a clip's token
    count by the keys that set its size)."""
    degree = cfg.train.context_parallel
    for key, count in tokens.items():
        if count % degree:
            raise ConfigError(
                f"train.context_parallel: {degree} workers must split the {count} tokens of a clip "
                f"of {key} evenly; choose a degree that divides {count}, or another size"
            )


def _local_heads(cfg: Config) -> int | None:
    """The trained transformer's head count from a local pipeline folder's config.json (None
    for a hub id: checked when the pipeline loads)."""
    config = Path(cfg.model.pretrained).expanduser() / (cfg.wan.expert or "transformer") / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("num_attention_heads")


class WanFamilyConfig(FamilyConfig):
    name = "wan"
    section = WanConfig
    context_parallel = True
    family = "svdray.models.wan.family:WanFamily"
    sample_flags = {
        "guidance_scale": SampleFlag(
            "wan.sample.guidance_scale", float, "wan: classifier-free guidance (default: the run's)"
        ),
        "negative_prompt": SampleFlag(
            "wan.sample.negative_prompt", str, "wan: the unconditional branch's prompt (default: the run's)"
        ),
    }
    layouts = (
        "i2v, the default, as Wan2.1-I2V; ti2v, as Wan2.2-TI2V-5B; a14b, as Wan2.2-I2V-A14B's two experts"
    )

    def check(self, cfg: Config) -> None:
        validate_wan(cfg)
        heads = _local_heads(cfg) if cfg.train.context_parallel > 1 else None
        if heads is not None:
            check_context_parallel_heads(heads, cfg, f"model.pretrained {cfg.model.pretrained}")
