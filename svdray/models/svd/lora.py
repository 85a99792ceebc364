"""Which modules of SVD's UNet a LoRA adapts: `lora.blocks` (spatial and/or temporal attention
blocks), `lora.target_modules` (projections inside them) and `lora.feed_forward`."""

from __future__ import annotations

import re

import peft
import torch

from svdray.config import LoraConfig
from svdray.models.lora import inject_lora

_BLOCK_PATTERNS = {"spatial": r"transformer_blocks", "temporal": r"temporal_transformer_blocks"}


def target_modules_regex(cfg: LoraConfig) -> str:
    """A full-match regex over module names selecting the projections to adapt.

    `transformer_blocks` alone would also match inside `temporal_transformer_blocks`, so the
    spatial pattern is anchored on the preceding dot.
    """
    blocks = [rf"\.{_BLOCK_PATTERNS[b]}" for b in cfg.blocks]
    projections = [re.escape(name) for name in cfg.target_modules]
    if cfg.feed_forward:
        projections += [re.escape("ff.net.0.proj"), re.escape("ff.net.2")]
    return rf".*({'|'.join(blocks)})\.\d+\.(attn1|attn2|ff)?\.?({'|'.join(projections)})"


def peft_config(cfg: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules_regex(cfg),
        init_lora_weights="gaussian",
    )


def add_lora(unet: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """LoRA layers on the UNet's chosen projections, everything else frozen; the same module."""
    return inject_lora(unet, peft_config(cfg))
