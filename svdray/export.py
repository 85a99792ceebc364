"""`svdray export`: a trained LoRA in the form other tools load.

    peft    the adapter folder (adapter_config.json + adapter_model.safetensors), loadable with
            peft alone (see README); every family
    merged  a complete pipeline folder whose denoiser has the LoRA merged into its weights and
            no LoRA layers left, loaded by the family's plain diffusers pipeline
    comfy   one .safetensors file in the key naming ComfyUI's loaders read (each family's own,
            see `ModelFamily.export`)

The family is the run's `model.family` (svd when the run config does not say).

`--run` is a training output_dir (its `lora/`), a checkpoint folder (`<storage>/<name>/step_N`,
its `lora/`), a LoRA folder itself, or an MLflow run id (its `lora/` and `config.yaml`
artifacts, from `--tracking-uri`). Every weight read is safetensors. The folders may be in a
bucket (`s3://`, `gs://`): a run whose `train.storage_path` is one keeps its final LoRA and
config in `<storage_path>/<name>/` (svdray.train.outputs), which reads like an output_dir.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from svdray import storage
from svdray.models import get_family
from svdray.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from svdray.safeload import check_folder, check_safetensors
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


@contextlib.contextmanager
def local_run(run: str | Path, flag: str = "--run") -> Iterator[Path]:
    """`run` as a local folder to read: a local path as it is; a folder in a bucket (a run's
    folder, a checkpoint, a LoRA folder) copied into a temporary folder, only its LoRA and the
    run's config (config.yaml or a checkpoint's state.json, beside the LoRA or one level up), so
    that `find_lora` and `run_config` read the copy as they read a local run."""
    if not storage.is_remote(run):
        yield Path(run)
        return
    try:
        storage.check(run, flag, "folder")
    except storage.StorageError as err:
        raise FileNotFoundError(str(err)) from None
    uri = storage.normalize(run)
    with tempfile.TemporaryDirectory(prefix="svdray-run-") as tmp:
        local = Path(tmp) / "run"
        local.mkdir()
        if storage.is_file(storage.join(uri, ADAPTER_CONFIG)):  # a LoRA folder; its run is above it
            config_from, lora_from, found = storage.parent(uri), uri, local / "lora"
        else:
            config_from, lora_from, found = uri, storage.join(uri, "lora"), local
        for name in ("config.yaml", STATE_FILE):
            if storage.is_file(storage.join(config_from, name)):
                storage.download(storage.join(config_from, name), local)
        if not storage.is_dir(lora_from):
            raise FileNotFoundError(
                f"{flag}: no LoRA in {uri} (expected a run folder or checkpoint with lora/, or a LoRA folder)"
            )
        storage.download(lora_from, local / "lora")
        yield found


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
    if storage.is_remote(run):
        with local_run(run) as local:
            return export(local, fmt, out, pipeline, dtype)
    lora_dir = find_lora(run)
    out = Path(out)
    if fmt == "peft":
        return export_peft(lora_dir, out)
    family = get_family(((run_config(run) or {}).get("model") or {}).get("family", "svd"))
    if fmt not in family.export_formats:
        raise ValueError(
            f"--format {fmt!r}: model.family {family.name} exports {', '.join(family.export_formats)}"
        )
    model = {}
    if fmt == "merged":  # the base model, and the run's options of its family (e.g. which expert trained)
        model = {**base_model(run, pipeline), "options": (run_config(run) or {}).get(family.name) or {}}
    return family.export(fmt, lora_dir, out, model, dtype)
