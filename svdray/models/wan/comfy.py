"""Parameter names of Wan's transformer: diffusers <-> the original Wan code (what ComfyUI loads).

The reference for the original names is diffusers' own single-file loader,
`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`, which renames an
original checkpoint to diffusers names; tests/unit/test_wan_comfy.py checks that running it on our
original names gives back every diffusers parameter name of the full-size Wan2.1-I2V-14B and
Wan2.2-TI2V-5B transformers (built on the meta device), one to one.

A LoRA exported for ComfyUI carries `diffusion_model.<original module>.lora_A.weight`,
`.lora_B.weight` and `.alpha` (ComfyUI scales each update by alpha / rank, as peft does with
lora_alpha / r), e.g. `diffusion_model.blocks.0.self_attn.q.lora_A.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

COMFY_PREFIX = "diffusion_model."

# Whole module paths outside the blocks (diffusers -> original).
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    # Wan2.1 I2V's CLIP projection (original nn.Sequential: LayerNorm, Linear, GELU, Linear, LayerNorm).
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
# Parameters that are not inside a module of their own.
_TOP_LEVEL_PARAMS = {"scale_shift_table": "head.modulation"}

# Module paths inside `blocks.<i>.` (diffusers -> original).
_IN_BLOCK = {
    **{
        f"attn1.{d}": f"self_attn.{o}"
        for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
    },
    **{
        f"attn2.{d}": f"cross_attn.{o}"
        for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
    },
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers' norm2 is the (affine) cross-attention norm, the original's norm3.
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_IN_BLOCK_PARAMS = {"scale_shift_table": "modulation"}

_TOP_LEVEL_BACK = {o: d for d, o in _TOP_LEVEL.items()}
_IN_BLOCK_BACK = {o: d for d, o in _IN_BLOCK.items()}
_BLOCK = re.compile(r"blocks\.(?P<index>\d+)\.(?P<rest>.+)")


def _rename_module(module: str, top: Mapping[str, str], in_block: Mapping[str, str]) -> str | None:
    match = _BLOCK.fullmatch(module)
    if match is not None:
        rest = in_block.get(match["rest"])
        return None if rest is None else f"blocks.{match['index']}.{rest}"
    return top.get(module)


def _rename_param(name: str, to_original: bool) -> str:
    top_params = _TOP_LEVEL_PARAMS if to_original else {o: d for d, o in _TOP_LEVEL_PARAMS.items()}
    block_params = _IN_BLOCK_PARAMS if to_original else {o: d for d, o in _IN_BLOCK_PARAMS.items()}
    if name in top_params:
        return top_params[name]
    match = _BLOCK.fullmatch(name)
    if match is not None and match["rest"] in block_params:
        return f"blocks.{match['index']}.{block_params[match['rest']]}"
    module, dot, leaf = name.rpartition(".")
    renamed = None
    if dot and leaf in ("weight", "bias"):
        if to_original:
            renamed = _rename_module(module, _TOP_LEVEL, _IN_BLOCK)
        else:
            renamed = _rename_module(module, _TOP_LEVEL_BACK, _IN_BLOCK_BACK)
    if renamed is None:
        side = "diffusers" if to_original else "original Wan"
        raise ValueError(f"{name!r} is not a parameter name of the {side} Wan transformer")
    return f"{renamed}.{leaf}"


def to_original_name(name: str) -> str:
    """diffusers `WanTransformer3DModel` parameter name -> the original Wan (ComfyUI) name."""
    return _rename_param(name, to_original=True)


def to_diffusers_name(name: str) -> str:
    """Original Wan parameter name (with or without `diffusion_model.`) -> the diffusers name."""
    return _rename_param(name.removeprefix(COMFY_PREFIX).removeprefix("model."), to_original=False)


_PEFT_KEY = re.compile(r"(?:transformer\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")


def comfy_lora_state_dict(
    lora_state_dict: Mapping[str, torch.Tensor], alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """peft/diffusers LoRA weights of the Wan transformer -> ComfyUI's Wan LoRA keys.

    Keys in: `<module>.lora_A/B.weight`, optionally with diffusers' `transformer.` prefix (as in
    pytorch_lora_weights.safetensors). Keys out: `diffusion_model.<original module>.lora_A/B.weight`
    and `diffusion_model.<original module>.alpha` (0-dim float32). Tensors are not copied.
    Raises ValueError naming the key for anything that is not a LoRA half of a known module, a
    module missing a half, or a rank other than `rank`.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state_dict.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{key!r} is not a LoRA weight ('<module>.lora_A.weight' / '.lora_B.weight')")
        halves.setdefault(match["module"], {})[match["part"]] = tensor
    out: dict[str, torch.Tensor] = {}
    for module, parts in halves.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise ValueError(f"{module}.{part}.weight is missing; LoRA module {module!r} is incomplete")
        if parts["lora_A"].shape[0] != rank or parts["lora_B"].shape[1] != rank:
            raise ValueError(f"LoRA module {module!r} has rank {parts['lora_A'].shape[0]}, expected {rank}")
        try:
            original = to_original_name(f"{module}.weight").removesuffix(".weight")
        except ValueError as err:
            raise ValueError(f"{module!r}: not a module of the Wan transformer") from err
        base = COMFY_PREFIX + original
        out[f"{base}.lora_A.weight"] = parts["lora_A"]
        out[f"{base}.lora_B.weight"] = parts["lora_B"]
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out
