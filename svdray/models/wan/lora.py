"""Which modules of Wan's transformer LoRA adapts, and the LoRA folder diffusers' Wan pipeline loads."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

from svdray.models.lora import lora_state_dict

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
    """Freeze the transformer and add a LoRA adapter ("default") through diffusers' PEFT mixin.

    The LoRA weights are float32 whatever the frozen weights' dtype (diffusers makes them the
    base layer's, e.g. bfloat16): the optimizer updates float32 weights, autocast casts them."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(feed_forward),
        init_lora_weights="gaussian",
    )
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"lora: no module of the transformer matches {config.target_modules!r}")
    for param in trainable:
        param.data = param.data.float()
    return config


def save_wan_lora(
    transformer: WanTransformer3DModel,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the LoRA folder `pipe.load_lora_weights(out_dir)` reads.

    `WanImageToVideoPipeline.save_lora_weights` format: pytorch_lora_weights.safetensors with
    `transformer.`-prefixed peft keys and the adapter's LoraConfig in the metadata (so alpha and
    rank come back). A LoRA of A14B's low-noise expert loads with
    `pipe.load_lora_weights(out_dir, load_into_transformer_2=True)`. `state_dict`: the
    transformer's parameters by name when it does not hold them whole (`lora_state_dict`).
    """
    out_dir = Path(out_dir)
    config = transformer.peft_config["default"]
    WanImageToVideoPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=lora_state_dict(transformer, state_dict),
        transformer_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    return out_dir
