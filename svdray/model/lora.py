"""LoRA on the SVD UNet with peft.

UNetSpatioTemporalConditionModel has no `add_adapter`/`save_lora_adapter` (no PeftAdapterMixin),
so adapters go in with `peft.inject_adapter_in_model` and come out with
`get_peft_model_state_dict`. The saved folder is peft's own format (adapter_config.json +
adapter_model.safetensors, keys without the adapter name), so a user needs only peft to load it:

    config = peft.LoraConfig.from_pretrained(lora_dir)
    unet = peft.inject_adapter_in_model(config, pipe.unet)
    peft.set_peft_model_state_dict(unet, safetensors.torch.load_file(lora_dir / "adapter_model.safetensors"))
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

from svdray.config import LoraConfig
from svdray.safeload import check_folder

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

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
    """Inject LoRA layers and freeze everything else; returns the same module."""
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(peft_config(cfg), unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"lora: no module of the UNet matches {target_modules_regex(cfg)!r}")
    return unet


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapter state dict (no adapter name in the keys), contiguous CPU float32 tensors."""
    state = peft.get_peft_model_state_dict(unet)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(
    unet: torch.nn.Module, cfg: LoraConfig, out_dir: str | Path, base_model: str | None = None
) -> Path:
    """peft's adapter folder; `base_model` (the pipeline trained on) goes into adapter_config.json
    as `base_model_name_or_path`, so the folder says what it applies to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(unet), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(cfg)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out_dir))
    return out_dir


def load_lora(unet: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
    """Inject the adapter described in `lora_dir` into `unet` and load its weights (safetensors only)."""
    lora_dir = check_folder(lora_dir, "LoRA")  # a .pt/.bin handed over is refused, never unpickled
    weights = lora_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no LoRA weights (expected peft's {ADAPTER_WEIGHTS})")
    config = peft.LoraConfig.from_pretrained(str(lora_dir))
    peft.inject_adapter_in_model(config, unet)
    result = peft.set_peft_model_state_dict(unet, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{weights}: keys that match no LoRA layer: {unexpected[:5]}")
    return unet
