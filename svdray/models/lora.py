"""LoRA with peft, for any family's denoiser (which modules it targets is the family's choice).

Adapters go in with `peft.inject_adapter_in_model` and come out with `get_peft_model_state_dict`
(SVD's denoiser has no diffusers `add_adapter`/`save_lora_adapter`). The saved folder is peft's own
format (adapter_config.json + adapter_model.safetensors, keys without the adapter name), so a
user needs only peft to load it:

    config = peft.LoraConfig.from_pretrained(lora_dir)
    model = peft.inject_adapter_in_model(config, pipe.unet)   # or pipe.transformer
    peft.set_peft_model_state_dict(model, safetensors.torch.load_file(lora_dir / "adapter_model.safetensors"))
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

from svdray.safeload import check_folder

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def inject_lora(model: torch.nn.Module, config: peft.LoraConfig) -> torch.nn.Module:
    """Inject LoRA layers and freeze everything else; returns the same module."""
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora: no module of {type(model).__name__} matches {config.target_modules!r}")
    return model


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen (non-LoRA) parameters and buffers of `model` in `dtype`, LoRA parameters untouched.

    In place on each tensor's `.data`, so parameter objects and names stay the same. Meant for
    bf16 autocast, which casts the float32 LoRA weights and the bf16 frozen ones alike for each
    matmul, while the optimizer keeps updating float32 LoRA weights.
    """
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """peft's adapter state dict (no adapter name in the keys), contiguous CPU float32 tensors.
    `state_dict`: the model's parameters by name, when the model does not hold them whole (a
    sharded model's, gathered: `svdray.train.parallel.Parallel.lora_state_dict`)."""
    state = peft.get_peft_model_state_dict(model, state_dict=state_dict)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(
    model: torch.nn.Module,
    out_dir: str | Path,
    base_model: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """peft's adapter folder, with the adapter config the model was injected with; `base_model`
    (the pipeline trained on) goes into adapter_config.json as `base_model_name_or_path`, so the
    folder says what it applies to. `state_dict` as for `lora_state_dict`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = lora_state_dict(model, state_dict)
    save_file(weights, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out_dir))
    return out_dir


def load_lora_weights(model: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
    """Load a LoRA folder's weights into the adapter already injected in `model`; every key must
    land and every LoRA layer must get its weights (a mismatch is an error naming the folder)."""
    lora_dir = check_folder(lora_dir, "LoRA")  # a .pt/.bin handed over is refused, never unpickled
    weights = lora_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no LoRA weights (expected peft's {ADAPTER_WEIGHTS})")
    result = peft.set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{weights}: does not match the denoiser's LoRA layers (keys that match no layer: "
            f"{unexpected[:3]}, layers without weights: {missing[:3]}); use the rank, blocks and "
            "target_modules it was trained with"
        )
    return model


def load_lora(model: torch.nn.Module, lora_dir: str | Path) -> torch.nn.Module:
    """Inject the adapter described in `lora_dir` into `model` and load its weights (safetensors only).

    peft creates the new LoRA layers in training mode even inside an eval-mode denoiser, which would
    apply LoRA dropout at inference; they are given the denoiser's own mode here."""
    lora_dir = check_folder(lora_dir, "LoRA")
    missing = [name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (lora_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{lora_dir}: not a LoRA folder (no {' or '.join(missing)})")
    peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(str(lora_dir)), model)
    model.train(model.training)
    return load_lora_weights(model, lora_dir)


def alpha_and_rank(lora_dir: str | Path) -> tuple[float, int]:
    """A LoRA folder's (alpha, rank) as kohya/ComfyUI files carry them: those tools scale each
    update by alpha / rank, peft's rsLoRA by lora_alpha / sqrt(rank)."""
    config = peft.LoraConfig.from_pretrained(str(lora_dir))
    if config.use_dora or config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            f"comfy export: {lora_dir}: DoRA and per-module ranks have no kohya/ComfyUI equivalent"
        )
    return config.lora_alpha * (math.sqrt(config.r) if config.use_rslora else 1.0), config.r


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA update into its base weight, then put the base layers back in place of the
    LoRA layers (as diffusers' `fuse_lora` + `unload_lora` do), so the state dict has exactly the
    original parameter names."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)  # safe_merge: refuses to write non-finite weights
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    leftover = [name for name in model.state_dict() if "lora_" in name or ".base_layer." in name]
    if leftover:
        raise RuntimeError(f"merging left LoRA parameters behind: {leftover[:3]}")
    return model
