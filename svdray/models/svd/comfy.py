"""Export a peft LoRA of the SVD UNet in the naming ComfyUI and kohya-style tools load.

Training adapts diffusers' `UNetSpatioTemporalConditionModel`, so peft names every LoRA
module by its diffusers path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
ComfyUI runs Stability AI's original `VideoUNet` (generative-models) and only matches LoRA
keys against *that* network's paths (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`):
for every weight `diffusion_model.<path>.weight` of its model it accepts
`lora_unet_<path with dots as underscores>.lora_up.weight` / `.lora_down.weight` / `.alpha`
(`comfy.lora.model_lora_keys_unet`). Its diffusers-name fallback (`unet_to_diffusers`) only
knows the SD UNet layout, not the spatio-temporal one, so a LoRA in diffusers naming is
silently ignored there; hence this converter.

The diffusers -> original mapping is written as rules, the way diffusers' own SD conversion
scripts are: block-index arithmetic for where a diffusers block lands among the original
`input_blocks` / `middle_block` / `output_blocks`, plus small renaming tables for what sits
inside a resnet or a transformer. It covers the default configuration (the one SVD and
SVD-XT ship with: 4 levels, `layers_per_block=2`, cross-attention on the first three down
levels and the last three up levels); tests check it is a shape-preserving bijection from
that model's 1428 parameters onto the original network's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file

ORIGINAL_PREFIX = "diffusion_model."
"""Prefix of the UNet's parameters in ComfyUI's model (`model.diffusion_model.` in the checkpoint)."""

KOHYA_PREFIX = "lora_unet_"

# --- The default SVD UNet configuration the index arithmetic is written for. ---------------
_NUM_LEVELS = 4
_DOWN_LAYERS = 2  # layers_per_block: resnets (and attentions) per down level
_UP_LAYERS = _DOWN_LAYERS + 1  # up levels have one more, consuming the extra skip connection
# An original down level occupies (_DOWN_LAYERS + 1) input_blocks (its layers + the downsampler),
# an up level _UP_LAYERS output_blocks (the upsampler shares the last one).
_DOWN_STRIDE = _DOWN_LAYERS + 1
_UP_STRIDE = _UP_LAYERS
# DownBlockSpatioTemporal (level 3) and UpBlockSpatioTemporal (level 0) have no attention.
_DOWN_LEVELS_WITH_ATTENTION = frozenset({0, 1, 2})
_UP_LEVELS_WITH_ATTENTION = frozenset({1, 2, 3})

# --- Renaming tables for what sits inside a block. -------------------------------------------
# Modules outside the blocks: diffusers module path -> original module path.
_TOP_LEVEL_MODULES: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# diffusers' ResnetBlock2D / TemporalResnetBlock layers -> the original ResBlock's Sequentials
# (in_layers = [GroupNorm, SiLU, conv], out_layers = [GroupNorm, SiLU, Dropout, conv]).
_RESNET_LAYERS: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Parameters inside one BasicTransformerBlock / TemporalBasicTransformerBlock. Both namings agree
# here (diffusers kept the original names), so these pass through unchanged.
_TRANSFORMER_BLOCK_PARAM = (
    r"(?:norm_in|norm1|norm2|norm3)\.(?:weight|bias)"
    r"|(?:attn1|attn2)\.(?:to_q|to_k|to_v)\.weight"
    r"|(?:attn1|attn2)\.to_out\.0\.(?:weight|bias)"
    r"|(?:ff|ff_in)\.net\.(?:0\.proj|2)\.(?:weight|bias)"
)
_PARAM = r"(?P<param>weight|bias)"

# Inside a SpatioTemporalResBlock (diffusers `resnets.N`) / VideoResBlock (original `N.0`).
_RESNET_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (
        re.compile(rf"spatial_res_block\.(?P<layer>{'|'.join(_RESNET_LAYERS)})\.{_PARAM}"),
        lambda m: f"{_RESNET_LAYERS[m['layer']]}.{m['param']}",
    ),
    (
        re.compile(rf"temporal_res_block\.(?P<layer>{'|'.join(_RESNET_LAYERS)})\.{_PARAM}"),
        lambda m: f"time_stack.{_RESNET_LAYERS[m['layer']]}.{m['param']}",
    ),
    (re.compile(r"time_mixer\.mix_factor"), lambda m: "time_mixer.mix_factor"),
)

# Inside a TransformerSpatioTemporalModel (diffusers `attentions.N`) / SpatialVideoTransformer.
_ATTENTION_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(rf"(?P<layer>norm|proj_in|proj_out)\.{_PARAM}"), lambda m: m[0]),
    (re.compile(rf"transformer_blocks\.\d+\.(?:{_TRANSFORMER_BLOCK_PARAM})"), lambda m: m[0]),
    (
        re.compile(rf"temporal_transformer_blocks\.(?P<rest>\d+\.(?:{_TRANSFORMER_BLOCK_PARAM}))"),
        lambda m: f"time_stack.{m['rest']}",
    ),
    # TimestepEmbedding(linear_1, act, linear_2) is an nn.Sequential(Linear, SiLU, Linear) there.
    (
        re.compile(rf"time_pos_embed\.linear_(?P<n>[12])\.{_PARAM}"),
        lambda m: f"time_pos_embed.{0 if m['n'] == '1' else 2}.{m['param']}",
    ),
    (re.compile(r"time_mixer\.mix_factor"), lambda m: "time_mixer.mix_factor"),
)


def _apply_rules(
    rules: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...], rest: str
) -> str | None:
    for pattern, convert in rules:
        match = pattern.fullmatch(rest)
        if match:
            return convert(match)
    return None


def _map_layer(kind: str, rest: str) -> str | None:
    """Map the part of a name below a `resnets.N` / `attentions.N` module."""
    return _apply_rules(_RESNET_RULES if kind == "resnets" else _ATTENTION_RULES, rest)


# Where a diffusers layer lands in the original block lists: a resnet is sub-module 0 of its
# TimestepEmbedSequential, the attention following it sub-module 1.
_SUBMODULE = {"resnets": 0, "attentions": 1}


def _map_down_layer(m: re.Match[str]) -> str | None:
    level, layer, kind = int(m["level"]), int(m["layer"]), m["kind"]
    if level >= _NUM_LEVELS or layer >= _DOWN_LAYERS:
        return None
    if kind == "attentions" and level not in _DOWN_LEVELS_WITH_ATTENTION:
        return None
    inner = _map_layer(kind, m["rest"])
    if inner is None:
        return None
    # input_blocks.0 is conv_in, so level L's layers start at input_blocks.(L*stride + 1).
    return f"input_blocks.{level * _DOWN_STRIDE + layer + 1}.{_SUBMODULE[kind]}.{inner}"


def _map_downsampler(m: re.Match[str]) -> str | None:
    level = int(m["level"])
    if level >= _NUM_LEVELS - 1:  # the lowest level does not downsample
        return None
    # The downsampler is the last input block of its level (a Downsample whose conv is `op`).
    return f"input_blocks.{level * _DOWN_STRIDE + _DOWN_STRIDE}.0.op.{m['param']}"


def _map_mid_layer(m: re.Match[str]) -> str | None:
    layer, kind = int(m["layer"]), m["kind"]
    # middle_block = [resnet, attention, resnet]: diffusers' resnets.0/1 and attentions.0.
    if kind == "resnets" and layer < 2:
        index = 2 * layer
    elif kind == "attentions" and layer == 0:
        index = 1
    else:
        return None
    inner = _map_layer(kind, m["rest"])
    return None if inner is None else f"middle_block.{index}.{inner}"


def _map_up_layer(m: re.Match[str]) -> str | None:
    level, layer, kind = int(m["level"]), int(m["layer"]), m["kind"]
    if level >= _NUM_LEVELS or layer >= _UP_LAYERS:
        return None
    if kind == "attentions" and level not in _UP_LEVELS_WITH_ATTENTION:
        return None
    inner = _map_layer(kind, m["rest"])
    if inner is None:
        return None
    return f"output_blocks.{level * _UP_STRIDE + layer}.{_SUBMODULE[kind]}.{inner}"


def _map_upsampler(m: re.Match[str]) -> str | None:
    level = int(m["level"])
    if level >= _NUM_LEVELS - 1:  # the top level does not upsample
        return None
    # The Upsample is appended to the level's last output block, after its resnet and, where
    # the level has one, its attention: sub-module 2 there, 1 on attention-less levels.
    submodule = 2 if level in _UP_LEVELS_WITH_ATTENTION else 1
    return f"output_blocks.{level * _UP_STRIDE + _UP_LAYERS - 1}.{submodule}.conv.{m['param']}"


def _map_top_level(m: re.Match[str]) -> str | None:
    return f"{_TOP_LEVEL_MODULES[m['module']]}.{m['param']}"


_TOP_LEVEL_ALTERNATION = "|".join(re.escape(name) for name in _TOP_LEVEL_MODULES)
_LAYER = r"(?P<kind>resnets|attentions)\.(?P<layer>\d+)\.(?P<rest>.+)"

_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str | None]], ...] = (
    (re.compile(rf"(?P<module>{_TOP_LEVEL_ALTERNATION})\.{_PARAM}"), _map_top_level),
    (re.compile(rf"down_blocks\.(?P<level>\d+)\.{_LAYER}"), _map_down_layer),
    (re.compile(rf"down_blocks\.(?P<level>\d+)\.downsamplers\.0\.conv\.{_PARAM}"), _map_downsampler),
    (re.compile(rf"mid_block\.{_LAYER}"), _map_mid_layer),
    (re.compile(rf"up_blocks\.(?P<level>\d+)\.{_LAYER}"), _map_up_layer),
    (re.compile(rf"up_blocks\.(?P<level>\d+)\.upsamplers\.0\.conv\.{_PARAM}"), _map_upsampler),
)


def diffusers_to_original_key(name: str) -> str:
    """Map a diffusers `UNetSpatioTemporalConditionModel` parameter name to the original one.

    The result is the name in Stability AI's `VideoUNet` without the `diffusion_model.` prefix,
    e.g. `down_blocks.0.resnets.1.temporal_res_block.conv2.weight` ->
    `input_blocks.2.0.time_stack.out_layers.3.weight`. Names that do not belong to the default
    SVD UNet raise ValueError rather than being passed through, so that an export can never
    contain a key ComfyUI would silently ignore.
    """
    for pattern, convert in _RULES:
        match = pattern.fullmatch(name)
        if match:
            original = convert(match)
            if original is not None:
                return original
            break
    raise ValueError(f"{name!r} is not a parameter of the default SVD UNet; cannot map it")


def kohya_module_name(original_module: str) -> str:
    """The kohya/ComfyUI name of an original UNet module path (dots become underscores)."""
    return KOHYA_PREFIX + original_module.replace(".", "_")


_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
_KOHYA_PART = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}


def export_comfy_lora(
    lora_state_dict: Mapping[str, torch.Tensor], alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """Rename peft's LoRA state dict of the UNet to kohya/ComfyUI keys.

    `lora_state_dict` is `peft.get_peft_model_state_dict(unet)` (keys like
    `<module>.lora_A.weight`, no adapter name). Each adapted module becomes
    `lora_unet_<original path>.lora_down.weight` (lora_A), `.lora_up.weight` (lora_B) and
    `.alpha`, a 0-dim float32 tensor: ComfyUI scales the update by alpha / rank, matching peft's
    `lora_alpha / r`, so the file reproduces the trained adapter. Tensors are not copied.

    Raises ValueError, naming the key, for a key that is not a LoRA A/B weight, a module that is
    not in the default SVD UNet, a module missing its A or B half, or a rank other than `rank`
    (a file holds one alpha/rank pair per module, so a mismatch would silently rescale it).
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    originals: dict[str, str] = {}  # diffusers module path -> original module path
    for key, tensor in lora_state_dict.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{key!r} is not a peft LoRA weight (expected '<module>.lora_A.weight' or "
                "'<module>.lora_B.weight' from get_peft_model_state_dict, without adapter name)"
            )
        module = match["module"]
        if module not in originals:
            try:
                originals[module] = diffusers_to_original_key(f"{module}.weight").removesuffix(".weight")
            except ValueError as err:
                raise ValueError(
                    f"{key!r}: LoRA module {module!r} is not a module of the original SVD UNet"
                ) from err
        halves.setdefault(module, {})[match["part"]] = tensor

    exported: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for module, parts in halves.items():
        original = originals[module]
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise ValueError(f"{module}.{part}.weight is missing; LoRA module {module!r} is incomplete")
        down, up = parts["lora_A"], parts["lora_B"]
        if down.shape[0] != rank or up.shape[1] != rank:
            raise ValueError(
                f"LoRA module {module!r} has rank {down.shape[0]} (lora_A) / {up.shape[1]} (lora_B), "
                f"expected {rank}"
            )
        name = kohya_module_name(original)
        if name in sources:  # impossible for a bijective mapping; guards against a broken rule
            raise ValueError(f"LoRA modules {sources[name]!r} and {module!r} both export as {name!r}")
        sources[name] = module
        exported[f"{name}.{_KOHYA_PART['lora_A']}"] = down
        exported[f"{name}.{_KOHYA_PART['lora_B']}"] = up
        exported[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return exported


def save_comfy_lora(
    lora_state_dict: Mapping[str, torch.Tensor],
    alpha: float,
    rank: int,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `export_comfy_lora(...)` as a .safetensors file ComfyUI's LoraLoader reads.

    kohya's `ss_network_dim` / `ss_network_alpha` metadata are filled in because LoRA browsers
    display them; entries of `metadata` take precedence.
    """
    tensors = {
        key: tensor.detach().cpu().contiguous()
        for key, tensor in export_comfy_lora(lora_state_dict, alpha, rank).items()
    }
    header = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    header.update(metadata or {})
    save_file(tensors, os.fspath(path), metadata=header)


_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def comfy_lora_targets(keys: Iterable[str], original_weight_names: Iterable[str]) -> dict[str, str]:
    """Resolve exported kohya keys to the original weights they patch, as ComfyUI does.

    Dots-as-underscores is lossy (`time_stack_0` could a priori be `time_stack.0` or
    `time_stack_0`), so a kohya name cannot be parsed back. Like `comfy.lora.model_lora_keys_unet`
    this instead names every original weight (`original_weight_names`, e.g. the keys of
    ComfyUI's UNet state dict, with or without the `diffusion_model.` prefix) the kohya way
    and looks the keys up. Returns {key: original weight name as given}; raises ValueError for a
    key that patches no listed weight, or if two listed weights share a kohya name.
    """
    lookup: dict[str, str] = {}
    for weight in original_weight_names:
        if not weight.endswith(".weight"):
            continue
        name = kohya_module_name(weight.removeprefix(ORIGINAL_PREFIX).removesuffix(".weight"))
        if name in lookup and lookup[name] != weight:
            raise ValueError(f"original weights {lookup[name]!r} and {weight!r} share the name {name!r}")
        lookup[name] = weight

    targets: dict[str, str] = {}
    for key in keys:
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        target = None if suffix is None else lookup.get(key.removesuffix(suffix))
        if target is None:
            raise ValueError(f"{key!r} patches none of the original UNet's weights")
        targets[key] = target
    return targets
