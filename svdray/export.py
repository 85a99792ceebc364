"""`svdray export`: a trained LoRA in the form other tools load.

    peft    the adapter folder (adapter_config.json + adapter_model.safetensors), loadable with
            peft alone (see README);
    merged  a complete pipeline folder whose UNet has the LoRA merged into its weights and no
            LoRA layers left: plain `StableVideoDiffusionPipeline.from_pretrained(out)` loads it;
    comfy   one .safetensors file in the original Stability naming with kohya's
            `lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha` keys, which
            ComfyUI's LoraLoader and kohya-style tools read (see svdray/model/comfy.py).

`--run` is a training output_dir (its `lora/`), a checkpoint folder (`<storage>/<name>/step_N`,
its `lora/`), a LoRA folder itself, or an MLflow run id (its `lora/` and `config.yaml`
artifacts, from `--tracking-uri`). Every weight read is safetensors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import peft
import torch
import yaml
from safetensors.torch import load_file

from svdray.model.comfy import save_comfy_lora
from svdray.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora
from svdray.model.pipeline import load_pipeline
from svdray.safeload import check_folder, check_pipeline_folder, check_safetensors
from svdray.train.checkpoint import STATE_FILE

Format = Literal["peft", "merged", "comfy"]


def find_lora(run: str | Path) -> Path:
    """The LoRA folder of an output_dir, a checkpoint folder, or a LoRA folder itself."""
    run = check_folder(run, "--run")
    for candidate in (run, run / "lora"):
        if (candidate / ADAPTER_CONFIG).is_file():
            check_safetensors(candidate / ADAPTER_WEIGHTS, "--run")
            return candidate
    raise FileNotFoundError(
        f"--run: no LoRA in {run} (expected a training output_dir with lora/, a checkpoint folder "
        f"step_N with lora/, or a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
    )


def run_config(run: str | Path) -> dict[str, Any] | None:
    """The config of the run that wrote `run` (or the folder above it): an output_dir's
    config.yaml or a checkpoint's state.json."""
    for folder in (Path(run), Path(run).parent):
        if (folder / "config.yaml").is_file():
            return yaml.safe_load((folder / "config.yaml").read_text())
        if (folder / STATE_FILE).is_file():
            return json.loads((folder / STATE_FILE).read_text()).get("config")
    return None


def base_model(run: str | Path, pipeline: str | None) -> dict[str, Any]:
    """The `model` section to merge into: `--pipeline` if given, else the run's own."""
    if pipeline:
        return {"pretrained": pipeline}
    config = run_config(run)
    if not config:
        raise ValueError(
            f"--run {run}: no run config found next to the LoRA; pass --pipeline (the base model)"
        )
    return config["model"]


def export_peft(lora_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(lora_dir / name, out / name)
    return out


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA update into its base weight, then put the base layers back in place of the
    LoRA layers (as diffusers' `fuse_lora` + `unload_lora` do), so the state dict has exactly the
    original parameter names."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)  # safe_merge: refuses to write non-finite weights
    recurse_remove_peft_layers(unet)
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    leftover = [name for name in unet.state_dict() if "lora_" in name or ".base_layer." in name]
    if leftover:
        raise RuntimeError(f"merging left LoRA parameters behind: {leftover[:3]}")
    return unet


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
    config = peft.LoraConfig.from_pretrained(str(lora_dir))
    if config.use_dora or config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"comfy export: {lora_dir}: DoRA and per-module ranks have no kohya equivalent")
    # kohya/ComfyUI scale by alpha / rank; peft's rsLoRA by alpha / sqrt(rank).
    alpha = config.lora_alpha * (math.sqrt(config.r) if config.use_rslora else 1.0)
    lora_state = load_file(str(lora_dir / ADAPTER_WEIGHTS))
    check_full_size_svd(lora_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_comfy_lora(lora_state, alpha, config.r, out, metadata={"svdray_source": str(lora_dir)})
    return out


RUN_ID = re.compile(r"[0-9a-f]{32}")


def is_run_id(run: str | Path) -> bool:
    """An MLflow run id (32 hex digits) that is not also a folder here."""
    return bool(RUN_ID.fullmatch(str(run))) and not Path(run).exists()


def fetch_run(run_id: str, tracking_uri: str, dst: Path) -> Path:
    """An MLflow run's `lora/` and `config.yaml` artifacts, downloaded into `dst`, which then
    reads like the run's output_dir."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        for artifact in ("lora", "config.yaml"):
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=tracking_uri
            )
    except (MlflowException, OSError) as err:
        raise FileNotFoundError(
            f"--run {run_id}: no lora/ and config.yaml artifacts in {tracking_uri}: {err}"
        ) from err
    return dst


def export(
    run: str | Path,
    fmt: Format,
    out: str | Path,
    pipeline: str | None = None,
    dtype: str = "float32",
    tracking_uri: str = "sqlite:///mlflow.db",
) -> Path:
    if is_run_id(run):
        with tempfile.TemporaryDirectory() as tmp:
            return export(fetch_run(str(run), tracking_uri, Path(tmp)), fmt, out, pipeline, dtype)
    lora_dir = find_lora(run)
    out = Path(out)
    if fmt == "peft":
        return export_peft(lora_dir, out)
    if fmt == "merged":
        model = base_model(run, pipeline)
        return export_merged(
            lora_dir, model["pretrained"], out, dtype, model.get("variant"), model.get("revision")
        )
    if fmt == "comfy":
        return export_comfy(lora_dir, out)
    raise ValueError(f"--format {fmt!r}: expected peft, merged or comfy")
