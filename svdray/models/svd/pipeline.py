"""Loading a Stable Video Diffusion pipeline, and building the tiny one used by the demo and tests.

Both paths end in `StableVideoDiffusionPipeline.from_pretrained`: the tiny pipeline is saved with
`save_pretrained` and read back exactly as a user's SVD-XT directory or hub id is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from svdray import console

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SVD-XT's own scheduler config. `timestep_type="continuous"` makes the UNet timestep
# c_noise = 0.25 * log(sigma), the same value training feeds it.
SVD_SCHEDULER_CONFIG = dict(
    prediction_type="v_prediction",
    use_karras_sigmas=True,
    sigma_min=0.002,
    sigma_max=700.0,
    timestep_type="continuous",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
)


def load_pipeline(
    pretrained: str | Path,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
) -> StableVideoDiffusionPipeline:
    """Load an SVD pipeline from a local directory or a hub id (weights as safetensors only)."""
    console.quiet_diffusers()
    return StableVideoDiffusionPipeline.from_pretrained(
        str(pretrained),
        dtype=DTYPES[dtype],
        variant=variant,
        revision=revision,
        use_safetensors=True,
    )


@dataclass
class FrozenModels:
    """The parts of the pipeline that never train, with what training and sampling need of them."""

    vae: torch.nn.Module
    image_encoder: torch.nn.Module
    feature_extractor: object
    scaling_factor: float
    vae_chunk: int = 16  # frames per VAE encode call (`speed.vae_chunk`)

    @classmethod
    def from_pipeline(
        cls,
        pipe: StableVideoDiffusionPipeline,
        device: torch.device | str | None = None,
        dtype: str | None = None,
    ) -> FrozenModels:
        """The pipeline's VAE and image encoder, frozen in eval mode (on `device`, in `dtype` if given)."""
        for module in (pipe.vae, pipe.image_encoder):
            module.requires_grad_(False).eval()
            if device is not None:
                module.to(device)
            if dtype is not None and module.dtype != DTYPES[dtype]:  # diffusers warns on any cast
                module.to(DTYPES[dtype])
        return cls(pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.vae.config.scaling_factor)


def scheduler_config(pretrained: str | Path, revision: str | None = None) -> dict:
    """The pipeline's sampler settings (its `scheduler/` config), without loading any weights."""
    return dict(EulerDiscreteScheduler.load_config(str(pretrained), subfolder="scheduler", revision=revision))


def unet_num_frames(pretrained: str | Path, revision: str | None = None) -> int:
    """The frame count the UNet was trained at (SVD 14, SVD-XT 25), from its config alone (14 when
    it cannot be read, e.g. a hub id offline: loading it fails then anyway)."""
    try:
        config = UNetSpatioTemporalConditionModel.load_config(
            str(pretrained), subfolder="unet", revision=revision
        )
    except OSError:
        return 14
    return int(config["num_frames"])


def build_tiny_pipeline(seed: int = 0, num_frames: int = 8) -> StableVideoDiffusionPipeline:
    """A randomly initialised SVD pipeline from the real classes, small enough for a CPU.

    Two UNet levels of 32/64 channels, a two-level VAE (downsampling by 2) and a 2-layer CLIP
    vision tower. CLIP keeps image_size 224 because the pipeline resizes to 224 before CLIP;
    patch size 32 keeps that cheap. Same seed, same weights.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNetSpatioTemporalConditionModel(
            sample_size=16,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=3 * 32,
            layers_per_block=1,
            cross_attention_dim=32,
            transformer_layers_per_block=1,
            num_attention_heads=(2, 4),
            num_frames=num_frames,
        )
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            sample_size=32,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                image_size=224,
                patch_size=32,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    # The PIL implementation by name: `CLIPImageProcessor` now means the torchvision one, which
    # transformers replaces by this one (with a warning) when torchvision is not installed.
    feature_extractor = CLIPImageProcessorPil(crop_size=224, size={"shortest_edge": 224})
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def save_tiny_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    console.quiet_diffusers()
    build_tiny_pipeline(seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --------------------------------------------------------------------------- full-size architectures
# SVD-XT's own component configs where the classes' defaults differ, for building it without a
# download (benchmarks). UNetSpatioTemporalConditionModel's defaults are SVD-XT's UNet (1.52 B
# parameters); AutoencoderKLTemporalDecoder's defaults are a small test size, so the VAE takes
# vae/config.json of stable-video-diffusion-img2vid-xt; the image encoder is OpenCLIP ViT-H/14's
# vision tower.
SVD_XT_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
    scaling_factor=0.18215,
    force_upcast=True,
)
SVD_XT_IMAGE_ENCODER = dict(
    hidden_size=1280,
    projection_dim=1024,
    num_hidden_layers=32,
    num_attention_heads=16,
    intermediate_size=5120,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
)
ARCHITECTURES: tuple[str, ...] = ("SVD-XT",)


def _pipeline(unet, vae, image_encoder, feature_extractor) -> StableVideoDiffusionPipeline:
    # A few parameters are made with the legacy torch.Tensor(...) constructor, which ignores the
    # device context: on meta, move everything.
    if next(unet.parameters()).device.type == "meta":
        unet, vae, image_encoder = unet.to("meta"), vae.to("meta"), image_encoder.to("meta")
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=feature_extractor,
    )


def build_full_size_pipeline(
    architecture: str, device: str | torch.device = "meta"
) -> StableVideoDiffusionPipeline:
    """A full-size pipeline (`ARCHITECTURES`: SVD-XT, about 2.25 B parameters) with random weights
    on `device` ("meta": shapes and dtypes only, nothing allocated). Same weights every time."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{architecture!r} is not one of {ARCHITECTURES}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel()
            vae = AutoencoderKLTemporalDecoder(**SVD_XT_VAE)
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_XT_IMAGE_ENCODER))
    finally:
        torch.random.set_rng_state(generator_state)
    return _pipeline(
        unet, vae, image_encoder, CLIPImageProcessorPil(crop_size=224, size={"shortest_edge": 224})
    )


def meta_pipeline(pretrained: str | Path) -> StableVideoDiffusionPipeline:
    """The pipeline of a folder with the components' configs (a downloaded pipeline, or one saved
    by `save_full_size_pipeline(weights=False)`) on the meta device: no weights are read."""
    pretrained = str(pretrained)
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(
            UNetSpatioTemporalConditionModel.load_config(pretrained, subfolder="unet")
        )
        vae = AutoencoderKLTemporalDecoder.from_config(
            AutoencoderKLTemporalDecoder.load_config(pretrained, subfolder="vae")
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig.from_pretrained(pretrained, subfolder="image_encoder")
        )
    feature_extractor = CLIPImageProcessorPil.from_pretrained(pretrained, subfolder="feature_extractor")
    return _pipeline(unet, vae, image_encoder, feature_extractor)


def save_full_size_pipeline(out_dir: str | Path, architecture: str, weights: bool = True) -> Path:
    """A full-size pipeline saved as a downloaded one is, with random weights (random init takes
    seconds on a GPU, about a minute on a CPU), or with `weights=False` its components' configs
    alone: enough for `meta_pipeline`."""
    out_dir = Path(out_dir)
    console.quiet_diffusers()
    if not weights:
        pipe = build_full_size_pipeline(architecture, "meta")
        pipe.unet.save_config(out_dir / "unet")
        pipe.vae.save_config(out_dir / "vae")
        pipe.image_encoder.config.save_pretrained(out_dir / "image_encoder")
        pipe.feature_extractor.save_pretrained(out_dir / "feature_extractor")
        return out_dir
    pipe = build_full_size_pipeline(architecture, "cuda" if torch.cuda.is_available() else "cpu")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
