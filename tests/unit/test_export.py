"""`svdray export`: the merged pipeline loads in plain diffusers and samples what the LoRA-applied
model samples; the peft folder is the adapter; the ComfyUI file lands on the original SVD UNet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import yaml
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from svdray import cli
from svdray.config import LoraConfig, ModelConfig
from svdray.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora, save_lora
from svdray.models.svd.comfy import ORIGINAL_PREFIX, comfy_lora_targets, diffusers_to_original_key
from svdray.models.svd.lora import add_lora, peft_config
from svdray.models.svd.sampler import SamplingSpec, load_sampling_models, sample_video
from svdray.train.checkpoint import TrainState, save_checkpoint
from tests.support.paths import DATA

REFERENCE_KEYS = DATA / "svd_unet_original_keys.tsv"
LORA = LoraConfig(rank=4, alpha=8, feed_forward=True)

# Plain diffusers, run by a fresh interpreter in isolated mode (-I: no PYTHONPATH, no cwd on
# sys.path), so nothing of svdray can be imported: what a user outside the project would write.
VANILLA = """
import sys
import numpy as np, torch
from PIL import Image
from diffusers import StableVideoDiffusionPipeline

folder, image, out = sys.argv[1:4]
pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
frames = pipe(Image.open(image), height=32, width=32, num_frames=8, num_inference_steps=3,
              fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8,
              generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames[0]
np.save(out, frames)
assert not any(name.startswith("svdray") for name in sys.modules)
"""


def sample(pipe, image: Path) -> np.ndarray:
    """The same call as VANILLA, in this process."""
    return pipe(
        Image.open(image),
        height=32,
        width=32,
        num_frames=8,
        num_inference_steps=3,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        decode_chunk_size=8,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).frames[0]


def random_lora(unet: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LoRA layers with random weights in both halves (a fresh LoRA's B is zero: a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    add_lora(unet, LORA)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return unet


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A training output_dir as `svdray train` leaves it: lora/ and the resolved config.yaml."""
    out = tmp_path_factory.mktemp("run")
    unet = random_lora(StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet)
    save_lora(unet, out / "lora")
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_pipeline_dir)}}))
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "cond.png"
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_merged_pipeline_loads_in_vanilla_diffusers(run_dir, image, tiny_pipeline_dir, tmp_path) -> None:
    merged = tmp_path / "merged"
    assert cli.main(["export", "--run", str(run_dir), "--format", "merged", "--out", str(merged)]) == 0

    # The merged UNet has exactly the base UNet's parameters: no LoRA layer is left.
    base = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    merged_unet = UNetSpatioTemporalConditionModel.from_pretrained(merged, subfolder="unet")
    assert merged_unet.state_dict().keys() == base.unet.state_dict().keys()

    frames_file = tmp_path / "vanilla.npy"
    subprocess.run(
        [sys.executable, "-I", "-c", VANILLA, str(merged), str(image), str(frames_file)],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    vanilla = np.load(frames_file)

    # svdray's sampler with the LoRA applied, at VANILLA's settings: plain diffusers on the merged
    # weights gives the same video (up to svdray's uint8 rounding).
    models = load_sampling_models(ModelConfig(pretrained=str(tiny_pipeline_dir)), run_dir / "lora", "cpu")
    spec = SamplingSpec(8, 32, 32, fps=7.0, motion_bucket_id=127, noise_aug_strength=0.02, steps=3)
    with_lora = sample_video(models, np.asarray(Image.open(image)), spec).astype(np.float32) / 255
    without = sample(base, image)
    assert vanilla.shape == with_lora.shape == (8, 32, 32, 3)
    np.testing.assert_allclose(vanilla, with_lora, atol=1 / 255 + 2e-3)
    assert np.abs(without - with_lora).mean() > 20 * np.abs(vanilla - with_lora).mean()


def test_peft_export_from_a_checkpoint_folder(run_dir, tiny_pipeline_dir, tmp_path) -> None:
    """--run also takes a checkpoint folder (step_N); the peft export is its adapter."""
    unet = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    load_lora(unet, run_dir / "lora")
    optimizer = torch.optim.AdamW([p for n, p in unet.named_parameters() if "lora_" in n])
    scheduler = get_scheduler("constant", optimizer)
    checkpoint = save_checkpoint(
        tmp_path / "step_00000007", unet, optimizer, scheduler, TrainState(7, 7), {}, {"model": {}}
    )
    out = tmp_path / "peft"
    assert cli.main(["export", "--run", str(checkpoint), "--format", "peft", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    exported, trained = (
        load_file(str(out / ADAPTER_WEIGHTS)),
        load_file(str(run_dir / "lora" / ADAPTER_WEIGHTS)),
    )
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    # Plain peft reads it (the README's recipe).
    config = peft.LoraConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha) == (LORA.rank, LORA.alpha)


def test_comfy_export_lands_on_original_svd_weights(tmp_path) -> None:
    """A LoRA of the full-size SVD UNet (built on the meta device; its weights are random real
    tensors of peft's shapes) exports to keys that each patch a listed original weight."""
    with torch.device("meta"):
        unet = add_lora(UNetSpatioTemporalConditionModel(), LORA)
    generator = torch.Generator().manual_seed(0)
    lora = {
        key: torch.randn(tensor.shape, generator=generator)
        for key, tensor in peft.get_peft_model_state_dict(unet).items()
    }
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file(lora, str(lora_dir / ADAPTER_WEIGHTS))
    peft_config(LORA).save_pretrained(str(lora_dir))

    out = tmp_path / "svd_lora.safetensors"
    assert cli.main(["export", "--run", str(lora_dir), "--format", "comfy", "--out", str(out)]) == 0
    exported = load_file(str(out))
    reference = [line.split("\t")[0] for line in REFERENCE_KEYS.read_text().splitlines()]
    targets = comfy_lora_targets(exported, reference)  # raises for any key that lands nowhere

    modules = {key.rsplit(".lora_", 1)[0] for key in lora}
    assert len(modules) == 16 * 2 * 10  # 16 transformers x (spatial, temporal) x (8 attn + 2 ff)
    assert len(exported) == 3 * len(modules)
    expected_targets = {ORIGINAL_PREFIX + diffusers_to_original_key(f"{m}.weight") for m in modules}
    assert set(targets.values()) == expected_targets
    for module in modules:
        name = "lora_unet_" + diffusers_to_original_key(f"{module}.weight").removesuffix(".weight").replace(
            ".", "_"
        )
        assert torch.equal(exported[f"{name}.lora_down.weight"], lora[f"{module}.lora_A.weight"])
        assert torch.equal(exported[f"{name}.lora_up.weight"], lora[f"{module}.lora_B.weight"])
        assert exported[f"{name}.alpha"].item() == LORA.alpha


def test_comfy_export_refuses_another_unet_layout(run_dir, tmp_path, capsys) -> None:
    """The tiny test UNet's blocks are laid out differently: its LoRA has no ComfyUI naming."""
    out = tmp_path / "tiny.safetensors"
    assert cli.main(["export", "--run", str(run_dir), "--format", "comfy", "--out", str(out)]) == 2
    assert "another layout" in capsys.readouterr().err
    assert not out.exists()


def test_export_config_is_read_from_the_run(run_dir) -> None:
    from svdray.export import base_model, find_lora

    assert find_lora(run_dir) == run_dir / "lora"
    assert find_lora(run_dir / "lora") == run_dir / "lora"
    assert (
        base_model(run_dir / "lora", None)["pretrained"]
        == yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["pretrained"]
    )
    assert json.loads((run_dir / "lora" / ADAPTER_CONFIG).read_text())["r"] == LORA.rank


def test_export_from_an_mlflow_run_id(run_dir, tmp_path) -> None:
    """--run also takes an MLflow run id: the run's lora/ and config.yaml artifacts are the run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("export", artifact_location=str(tmp_path / "mlruns"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(run_dir / "lora"), artifact_path="lora")
    client.log_artifact(run_id, str(run_dir / "config.yaml"))
    out = tmp_path / "peft"
    command = ["export", "--run", run_id, "--format", "peft", "--out", str(out), "--tracking-uri", uri]
    assert cli.main(command) == 0
    exported = load_file(str(out / ADAPTER_WEIGHTS))
    trained = load_file(str(run_dir / "lora" / ADAPTER_WEIGHTS))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)

    missing = "0" * 32  # a run id this store does not have: an error naming --run, exit code 2
    assert cli.main([*command[:2], missing, *command[3:]]) == 2
