"""Wan's exports: a merged pipeline folder and ComfyUI's Wan LoRA file (see `svdray.export`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from svdray.models.lora import ADAPTER_WEIGHTS, alpha_and_rank, load_lora, merge_lora
from svdray.models.wan.comfy import comfy_lora_state_dict
from svdray.models.wan.pipeline import FULL_SIZE_TRANSFORMERS, load_wan_pipeline, meta_transformer
from svdray.safeload import check_pipeline_folder


def export_merged(
    lora_dir: Path, model: dict, out: Path, dtype: str = "float32", expert: str | None = None
) -> Path:
    """The base pipeline with the LoRA merged into the expert it trained, saved as safetensors in
    `dtype`: a plain `WanImageToVideoPipeline` folder with no LoRA layers."""
    pretrained = model["pretrained"]
    if Path(pretrained).exists():
        check_pipeline_folder(pretrained, "--pipeline")
    # Merged in float32, then cast.
    pipe = load_wan_pipeline(pretrained, "float32", model.get("variant"), model.get("revision"), "float32")
    merge_lora(load_lora(getattr(pipe, expert or "transformer"), lora_dir))
    pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def check_full_size_wan(lora_state: dict[str, torch.Tensor]) -> str:
    """The name of the full-size Wan transformer (FULL_SIZE_TRANSFORMERS) every LoRA weight fits,
    by module name and shape; a LoRA of another layout (e.g. the tiny test model) is refused:
    ComfyUI would patch weights of the wrong shape."""
    problems = []
    for name in FULL_SIZE_TRANSFORMERS:
        modules = dict(meta_transformer(name).named_modules())
        for key, tensor in lora_state.items():
            module_name, _, part = key.removeprefix("transformer.").rpartition(".lora_")
            target = modules.get(module_name)
            if not isinstance(target, torch.nn.Linear):
                problems.append(f"{name}: {module_name!r} is not one of its linear layers")
                break
            features = target.in_features if part.startswith("A") else target.out_features
            if tensor.shape[1 if part.startswith("A") else 0] != features:
                problems.append(f"{name}: {key!r} has shape {tuple(tensor.shape)}")
                break
        else:
            return name
    raise ValueError(
        "comfy export: this LoRA was trained on a transformer of another layout (e.g. the tiny test "
        f"model): it fits no full-size Wan transformer ({'; '.join(problems)})"
    )


def export_comfy(lora_dir: Path, out: Path) -> Path:
    """One .safetensors file with ComfyUI's Wan LoRA keys: `diffusion_model.<original Wan
    module>.lora_A.weight` / `.lora_B.weight` / `.alpha`."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the comfy format is one .safetensors file")
    alpha, rank = alpha_and_rank(lora_dir)
    lora_state = load_file(str(lora_dir / ADAPTER_WEIGHTS))
    layout = check_full_size_wan(lora_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = comfy_lora_state_dict(lora_state, alpha, rank)
    save_file(state, str(out), metadata={"svdray_source": str(lora_dir), "svdray_layout": layout})
    return out
