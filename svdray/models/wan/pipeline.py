"""Wan image-to-video pipelines: loading, the three layouts, and the tiny pipelines of the tests.

One diffusers class, `WanImageToVideoPipeline`, covers three layouts:

- "i2v"  Wan2.1-I2V-14B: a CLIP image encoder, the 16-channel VAE; the transformer sees
         [noisy latents | 4 mask channels | latent of (image, zeros...)] (36 channels).
- "ti2v" Wan2.2-TI2V-5B (`expand_timesteps`): no image encoder, the 48-channel VAE; latent
         frame 0 is replaced by the clean image latent and its per-token timestep is 0.
- "a14b" Wan2.2-I2V-A14B: the "i2v" input without an image encoder, and two experts,
         `transformer` for timesteps >= boundary_ratio * 1000 and `transformer_2` below.

The tiny pipelines are built from the real classes (with a tokenizer trained here, no hub
download), saved with `save_pretrained` and read back with `from_pretrained`, as a user's are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from svdray import console
from svdray.models.float8 import storage_dtype
from svdray.models.random_weights import to_device
from svdray.models.wan.config import WAN_SIDE_MULTIPLE
from svdray.models.wan.config import check_wan_num_frames as check_num_frames

Layout = Literal["i2v", "ti2v", "a14b"]
LAYOUTS: tuple[str, ...] = ("i2v", "ti2v", "a14b")
EXPERTS: tuple[str, ...] = ("transformer", "transformer_2")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_DTYPES = (torch.float16, torch.bfloat16)

# The pipeline's own default for `max_sequence_length`. The transformer attends to every one of
# these tokens (zero padding included, there is no attention mask), so training must pad to the
# same length the sampler uses.
MAX_SEQUENCE_LENGTH = 512

# Mask channels the "i2v"/"a14b" transformer input carries: one per frame of the first temporal
# group of the VAE (its temporal compression).
_MASK_CHANNELS = 4

# Scheduler shifts of the real checkpoints (sample_shift in Wan's configs, e.g.
# Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py: 5.0; Wan2.1 I2V 480P ships flow_shift 3.0).
_SHIFT = {"i2v": 3.0, "ti2v": 5.0, "a14b": 5.0}
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


# The layout of each full-size architecture, and its frozen encoders. VAEs: diffusers'
# scripts/convert_wan_to_diffusers.py (Wan2.1: the AutoencoderKLWan defaults; Wan2.2: base_dim
# 160, z_dim 48, residual, 2x2 patchify). UMT5-XXL encoder (google/umt5-xxl) and CLIP ViT-H/14
# (open-clip xlm-roberta-large-vit-huge-14) as the Wan-AI *-Diffusers repos configure them.
FULL_SIZE_LAYOUTS: dict[str, Layout] = {
    "Wan2.1-I2V-14B": "i2v",
    "Wan2.2-TI2V-5B": "ti2v",
    "Wan2.2-I2V-A14B": "a14b",
}
_FULL_SIZE_VAE = {
    16: dict(),
    48: dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    ),
}
_UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
_CLIP_VIT_H = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
)


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
    return _pipeline(
        layout, vae, text_encoder, transformer, transformer_2, image_encoder, image_processor, tokenizer
    )


def _pipeline(
    layout: Layout,
    vae: AutoencoderKLWan,
    text_encoder: UMT5EncoderModel,
    transformer: WanTransformer3DModel,
    transformer_2: WanTransformer3DModel | None = None,
    image_encoder: CLIPVisionModel | None = None,
    image_processor: CLIPImageProcessor | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> WanImageToVideoPipeline:
    return WanImageToVideoPipeline(
        tokenizer=tokenizer or _tiny_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=_SHIFT[layout]),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=_A14B_BOUNDARY_RATIO if layout == "a14b" else None,
        expand_timesteps=layout == "ti2v",
    )


def _on(device: str | torch.device, *modules: torch.nn.Module | None) -> list[torch.nn.Module | None]:
    """Each module on `device`: tensors a constructor makes with the legacy torch.Tensor(...)
    ignore the device context."""
    return [to_device(module, device) if module is not None else None for module in modules]


def build_full_size_pipeline(
    architecture: str, device: str | torch.device = "meta"
) -> WanImageToVideoPipeline:
    """A full-size pipeline (a key of `FULL_SIZE_LAYOUTS`) with random weights on `device` ("meta":
    shapes and dtypes only, nothing allocated; inside `random_weights.empty_parameters()`,
    parameters on meta and buffers on `device`), the checkpoint's shift and expert boundary. Its
    tokenizer is the tiny pipelines' word-level one: a stand-in (UMT5's 256k vocabulary is not
    here), whose ids the full-size text encoder takes all the same."""
    if architecture not in FULL_SIZE_LAYOUTS:
        raise ValueError(f"{architecture!r} is not one of {sorted(FULL_SIZE_LAYOUTS)}")
    layout = FULL_SIZE_LAYOUTS[architecture]
    transformer_config = FULL_SIZE_TRANSFORMERS[architecture]
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with torch.device(device):
            transformer = WanTransformer3DModel(**transformer_config)
            transformer_2 = WanTransformer3DModel(**transformer_config) if layout == "a14b" else None
            vae = AutoencoderKLWan(**_FULL_SIZE_VAE[transformer_config["out_channels"]])
            text_encoder = UMT5EncoderModel(UMT5Config(**_UMT5_XXL))
            image_encoder = CLIPVisionModel(CLIPVisionConfig(**_CLIP_VIT_H)) if layout == "i2v" else None
    finally:
        torch.random.set_rng_state(rng_state)
    image_processor = (
        CLIPImageProcessorPil(crop_size=224, size={"shortest_edge": 224}) if image_encoder else None
    )
    modules = _on(device, vae, text_encoder, transformer, transformer_2, image_encoder)
    return _pipeline(layout, *modules, image_processor)


def meta_pipeline(pretrained: str | Path, device: str | torch.device = "meta") -> WanImageToVideoPipeline:
    """The pipeline of a folder with the components' configs (a downloaded pipeline, or one saved
    by `save_full_size_pipeline(weights=False)`) on the meta device: no weights are read. (Inside
    `random_weights.empty_parameters()`, `device` is where its buffers are made.)"""
    pretrained = str(pretrained)
    index = WanImageToVideoPipeline.load_config(pretrained)

    def has(name: str) -> bool:
        return (index.get(name) or [None])[0] is not None

    def transformer_at(name: str) -> WanTransformer3DModel:
        return WanTransformer3DModel.from_config(
            WanTransformer3DModel.load_config(pretrained, subfolder=name)
        )

    with torch.device(device):
        transformer = transformer_at("transformer")
        transformer_2 = transformer_at("transformer_2") if has("transformer_2") else None
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(pretrained, subfolder="vae"))
        text_encoder = UMT5EncoderModel(UMT5Config.from_pretrained(pretrained, subfolder="text_encoder"))
        image_encoder = None
        if has("image_encoder"):
            image_encoder = CLIPVisionModel(
                CLIPVisionConfig.from_pretrained(pretrained, subfolder="image_encoder")
            )
    image_processor = None
    if has("image_processor"):
        image_processor = CLIPImageProcessorPil.from_pretrained(pretrained, subfolder="image_processor")
    tokenizer = None
    if has("tokenizer"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained, subfolder="tokenizer")
    scheduler_class = getattr(diffusers, index["scheduler"][1])  # Wan2.1's checkpoints ship UniPC
    scheduler = scheduler_class.from_pretrained(pretrained, subfolder="scheduler")
    layout: Layout = (
        "ti2v" if index.get("expand_timesteps") else "a14b" if index.get("boundary_ratio") else "i2v"
    )
    modules = _on(device, vae, text_encoder, transformer, transformer_2, image_encoder)
    return _pipeline(layout, *modules, image_processor, tokenizer, scheduler)


def save_full_size_pipeline(out_dir: str | Path, architecture: str, weights: bool = True) -> Path:
    """A full-size pipeline saved as a downloaded one is, with random weights (on a GPU if there
    is one), or with `weights=False` its components' configs alone: enough for `meta_pipeline`."""
    out_dir = Path(out_dir)
    console.quiet_diffusers()
    if weights:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_full_size_pipeline(architecture, device).save_pretrained(out_dir, safe_serialization=True)
        return out_dir
    pipe = build_full_size_pipeline(architecture, "meta")
    pipe.save_config(out_dir)  # model_index.json
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and the scheduler
            component.save_config(out_dir / name)
        elif isinstance(component, torch.nn.Module):  # transformers models
            component.config.save_pretrained(out_dir / name)
        else:  # tokenizer, image processor
            component.save_pretrained(out_dir / name)
    return out_dir


def save_tiny_wan_pipeline(out_dir: str | Path, layout: Layout = "i2v", seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    build_tiny_wan_pipeline(layout, seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def component_dtypes(dtype: str = "float32", encoder_dtype: str | None = None) -> dict[str, torch.dtype]:
    """Each component's dtype as `load_wan_pipeline` loads it ("default": the others'); "float8"
    loads bf16 (training quantises the trained expert's blocks after the LoRA is in)."""
    dtype = storage_dtype(dtype)
    for key, value in (("model.denoiser_dtype", dtype), ("model.frozen_dtype", encoder_dtype or dtype)):
        if value not in DTYPES:
            raise ValueError(f"{key}: {value!r} is not one of {sorted(DTYPES)}")
    if encoder_dtype is None:
        return {"default": DTYPES[dtype], "vae": torch.float32, "image_encoder": torch.float32}
    frozen = DTYPES[encoder_dtype]
    return {"default": frozen, "transformer": DTYPES[dtype], "transformer_2": DTYPES[dtype]}


def cast_as_loaded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype` as `from_pretrained(dtype=...)` loads it: diffusers keeps the parameters
    of its `_keep_in_fp32_modules` (the transformer's norms, time embedding, ...) in float32;
    transformers keeps its `_keep_in_fp32_modules` (UMT5's `wo`) so for float16 alone, and its
    `_keep_in_fp32_modules_strict` for float16 and bfloat16."""
    if isinstance(module, PreTrainedModel):
        keep = set(module._keep_in_fp32_modules_strict or ()) if dtype in HALF_DTYPES else set()
        if dtype == torch.float16:
            keep |= set(module._keep_in_fp32_modules or ())
    else:
        keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return module


def load_wan_pipeline(
    pretrained: str | Path,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
    encoder_dtype: str | None = None,
    transformers: bool = True,
) -> WanImageToVideoPipeline:
    """Load a Wan image-to-video pipeline (local folder or hub id, safetensors only).

    The transformer(s) load in `dtype` (not at all with `transformers=False`: the latent cache
    needs only the encoders). The VAE, the text and the image encoder load in
    `encoder_dtype` (training's `model.frozen_dtype`); None keeps the text encoder in `dtype`
    and the VAE and CLIP in float32, as Wan's own code runs them. "float8" loads bf16 (training
    quantises the trained expert's blocks after the LoRA is in: `svdray.models.float8`).
    """
    dtypes = component_dtypes(dtype, encoder_dtype)
    skipped = {} if transformers else {"transformer": None, "transformer_2": None}
    console.quiet_diffusers()
    return WanImageToVideoPipeline.from_pretrained(
        str(pretrained), dtype=dtypes, variant=variant, revision=revision, use_safetensors=True, **skipped
    )


def load_expert(
    pretrained: str | Path, name: str, dtype: str, variant: str | None = None, revision: str | None = None
) -> WanTransformer3DModel:
    """One transformer of a pipeline (`name`: "transformer" or "transformer_2"), loaded alone."""
    return WanTransformer3DModel.from_pretrained(
        str(pretrained),
        subfolder=name,
        dtype=DTYPES[storage_dtype(dtype)],
        variant=variant,
        revision=revision,
        use_safetensors=True,
    )


def default_num_frames(pretrained: str | Path, revision: str | None = None) -> int:
    """The frame count the checkpoints were trained at (Wan2.2-TI2V-5B 121, Wan2.1 and A14B 81),
    from the pipeline's config alone (81 when it cannot be read, e.g. a hub id offline)."""
    try:
        config = WanImageToVideoPipeline.load_config(str(pretrained), revision=revision)
    except OSError:
        return 81
    return 121 if config.get("expand_timesteps") else 81


def side_multiple(pretrained: str | Path, revision: str | None = None) -> int:
    """What a pipeline's sides must be multiples of, from its configs alone (no weights load):
    the VAE's spatial compression times the transformer's patch, as the pipeline computes it
    (`vae_scale_factor_spatial`): 16, or 32 for Wan2.2-TI2V-5B's 16x VAE. A pipeline whose configs
    cannot be read (a hub id offline) gets Wan's general rule, checked again when it loads."""
    try:
        vae = AutoencoderKLWan.load_config(str(pretrained), subfolder="vae", revision=revision)
        transformer = WanTransformer3DModel.load_config(
            str(pretrained), subfolder="transformer", revision=revision
        )
    except OSError:
        return WAN_SIDE_MULTIPLE
    return int(vae.get("scale_factor_spatial", 8)) * int(transformer.get("patch_size", (1, 2, 2))[1])


def wan_layout(pipe: WanImageToVideoPipeline) -> Layout:
    if pipe.config.expand_timesteps:
        return "ti2v"
    if pipe.config.boundary_ratio is not None:
        return "a14b"
    return "i2v"


def num_latent_frames(num_frames: int, temporal_compression: int = 4) -> int:
    """Latent frames of a 4k + 1 frame clip: the first frame alone, then 4 frames each."""
    check_num_frames(num_frames, temporal_compression=temporal_compression)
    return (num_frames - 1) // temporal_compression + 1
