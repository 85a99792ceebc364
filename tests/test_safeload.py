"""Pickles handed to any svdray command are refused with a message naming the file; nothing is
ever unpickled (torch.load and pickle.load are tripwires during these tests)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from svdray import cli
from svdray.config import ConfigError, load_config
from svdray.model.lora import ADAPTER_CONFIG
from svdray.safeload import UnsafeFileError, check_safetensors
from svdray.train.checkpoint import load_checkpoint


@pytest.fixture
def pickles(tmp_path) -> dict[str, Path]:
    """Real torch.save files (zip pickles), one raw pickle, and folders holding them."""
    tensors = {"w": torch.zeros(2, 2)}
    made = {}
    for name in ("lora.pt", "adapter.bin", "model.ckpt"):
        torch.save(tensors, tmp_path / name)
        made[name] = tmp_path / name
    made["raw"] = tmp_path / "weights"  # no suffix: recognised by its bytes
    made["raw"].write_bytes(pickle.dumps(tensors, protocol=4))

    # A peft folder as `save_pretrained(safe_serialization=False)` writes it.
    bin_lora = tmp_path / "bin_lora"
    bin_lora.mkdir()
    (bin_lora / ADAPTER_CONFIG).write_text("{}")
    shutil.copy(made["adapter.bin"], bin_lora / "adapter_model.bin")
    made["bin_lora"] = bin_lora
    # A pickle renamed to .safetensors.
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / ADAPTER_CONFIG).write_text("{}")
    shutil.copy(made["lora.pt"], disguised / "adapter_model.safetensors")
    made["disguised"] = disguised
    # A checkpoint folder of another trainer: optimizer.pt, state.json.
    foreign = tmp_path / "foreign_ckpt"
    foreign.mkdir()
    shutil.copy(made["lora.pt"], foreign / "optimizer.pt")
    made["foreign_ckpt"] = foreign
    return made


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("something tried to unpickle a file")

    monkeypatch.setattr(torch, "load", tripwire)
    monkeypatch.setattr(pickle, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)


def refused(capsys, argv: list[str], needle: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and needle in err, err


def test_train_refuses_pickled_resume_and_model(
    pickles, one_clip_manifest, write_config, tiny_pipeline_dir, capsys
) -> None:
    config = write_config(one_clip_manifest)
    refused(capsys, ["train", "--config", str(config), "--resume", str(pickles["model.ckpt"])], "model.ckpt")
    refused(capsys, ["train", "--config", str(config), "--resume", str(pickles["raw"])], "weights")
    with pytest.raises(ConfigError, match=r"model.pretrained: .*lora.pt is a pickle"):
        load_config(write_config(one_clip_manifest, model={"pretrained": str(pickles["lora.pt"])}))


def test_sample_refuses_pickled_lora(pickles, tiny_pipeline_dir, tmp_path, capsys) -> None:
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    for lora, needle in [
        (pickles["lora.pt"], "lora.pt"),
        (pickles["bin_lora"], "adapter_model.bin"),
        (pickles["disguised"], "adapter_model.safetensors"),
    ]:
        argv = ["sample", "--pipeline", str(tiny_pipeline_dir), "--lora", str(lora), "--image", str(image)]
        refused(capsys, [*argv, "--out", str(tmp_path / "o.mp4"), "--steps", "1"], needle)
    refused(
        capsys,
        ["sample", "--pipeline", str(pickles["model.ckpt"]), "--image", str(image), "--out", "o.mp4"],
        "model.ckpt",
    )


def test_export_refuses_pickles(pickles, tmp_path, capsys) -> None:
    for run, needle in [(pickles["model.ckpt"], "model.ckpt"), (pickles["bin_lora"], "adapter_model.bin")]:
        refused(
            capsys, ["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "x")], needle
        )


def test_checkpoint_loading_refuses_pickles(pickles) -> None:
    for folder in (pickles["model.ckpt"], pickles["foreign_ckpt"]):
        with pytest.raises(UnsafeFileError, match="pickle"):
            load_checkpoint(folder, torch.nn.Linear(1, 1), None, None)
    with pytest.raises(UnsafeFileError, match="pickle"):
        check_safetensors(pickles["disguised"] / "adapter_model.safetensors", "LoRA")
