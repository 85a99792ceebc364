"""SVD's exports: a merged pipeline folder and ComfyUI's LoRA file (see `svdray.export`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from svdray.models.lora import ADAPTER_WEIGHTS, alpha_and_rank, load_lora, merge_lora
from svdray.models.svd.comfy import save_comfy_lora
from svdray.models.svd.pipeline import load_pipeline
from svdray.safeload import check_pipeline_folder


def export_merged(
    lora_dir: Path,
    pretrained: str,
    out: Path,
    dtype: str = "float32",
    variant: str | None = None,
    revision: str | None = None,
) -> Path:
    """The base pipeline with the LoRA merged into its UNet, saved as safetensors in `dtype`."""
    if Path(pretrained).exists():
        check_pipeline_folder(pretrained, "--pipeline")
    pipe = load_pipeline(pretrained, "float32", variant, revision)  # merge in float32, then cast
    merge_lora(load_lora(pipe.unet, lora_dir))
    pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def check_full_size_svd(lora_state: dict[str, torch.Tensor]) -> None:
    """The comfy naming is the original SVD UNet's: refuse a LoRA of any other UNet layout (e.g.
    the tiny test model) instead of writing keys that would patch the wrong weights."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        modules = dict(UNetSpatioTemporalConditionModel().named_modules())
    for key, tensor in lora_state.items():
        module_name, _, part = key.rpartition(".lora_")
        target = modules.get(module_name)
        if not isinstance(target, torch.nn.Linear):
            raise ValueError(
                f"comfy export: {key!r}: {module_name!r} is not a linear layer of the full-size SVD UNet: "
                "this LoRA was trained on a UNet with another layout, and the ComfyUI naming exists "
                "only for Stability's SVD/SVD-XT UNet"
            )
        expected = target.in_features if part.startswith("A") else target.out_features
        actual = tensor.shape[1] if part.startswith("A") else tensor.shape[0]
        if actual != expected:
            raise ValueError(
                f"comfy export: {key!r} has shape {tuple(tensor.shape)}, but {module_name!r} of the "
                f"full-size SVD UNet has {target.in_features} inputs and {target.out_features} outputs: "
                "this LoRA was trained on a UNet with another layout (e.g. the tiny test model)"
            )


def export_comfy(lora_dir: Path, out: Path) -> Path:
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the comfy format is one .safetensors file")
    alpha, rank = alpha_and_rank(lora_dir)
    lora_state = load_file(str(lora_dir / ADAPTER_WEIGHTS))
    check_full_size_svd(lora_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_comfy_lora(lora_state, alpha, rank, out, metadata={"svdray_source": str(lora_dir)})
    return out
