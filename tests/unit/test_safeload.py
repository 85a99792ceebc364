"""Pickles handed to any svdray command are refused with a message naming the file; nothing is
ever unpickled (torch.load and pickle.load are tripwires during these tests). Real safetensors
files are accepted whatever their first byte: the check decides by the file's structure."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdray import cli
from svdray.config import ConfigError, load_config
from svdray.models.lora import ADAPTER_CONFIG
from svdray.models.svd.pipeline import load_pipeline
from svdray.safeload import UnsafeFileError, check_folder, check_pipeline_folder, check_safetensors
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


def resave_with_header_ending_in_0x80(path: Path) -> bytes:
    """Rewrite a real safetensors file with the same tensors and metadata padded until its header
    length's low byte, the file's first byte, is 0x80 (as one header length in 256 has); returns
    the file's first 10 bytes."""
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": "pt", "pad": ""})
    # The header is JSON padded with spaces to a multiple of 8 bytes; each pad character adds one
    # byte of JSON, so the padding that works is found without writing the file again and again.
    data = path.read_bytes()
    json_length = len(data[8 : 8 + struct.unpack("<Q", data[:8])[0]].rstrip(b" "))
    pad = next(pad for pad in range(2048) if (json_length + pad + 7) // 8 * 8 % 256 == 0x80)
    save_file(tensors, str(path), metadata={"format": "pt", "pad": "x" * pad})
    head = path.read_bytes()[:10]
    if head[0] != 0x80:
        raise AssertionError(f"padding {pad} did not give {path} a header length ending in 0x80")
    return head


def test_safetensors_starting_with_0x80_is_accepted(
    tiny_pipeline_dir, tmp_path, write_config, one_clip_manifest
) -> None:
    """The issue's case: a pipeline whose fp16 VAE file begins `80 b4 00 00 00 00 00 00 7b 22`."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    vae_file = pipeline / "vae" / "diffusion_pytorch_model.safetensors"
    expected = load_file(str(vae_file))
    head = resave_with_header_ending_in_0x80(vae_file)
    assert head[0] == 0x80 and head[8:9] == b"{", head
    assert struct.unpack("<Q", head[:8])[0] % 256 == 0x80

    assert check_safetensors(vae_file, "VAE") == vae_file
    assert check_folder(vae_file.parent, "VAE") == vae_file.parent
    assert check_pipeline_folder(pipeline, "model.pretrained") == pipeline
    cfg = load_config(write_config(one_clip_manifest, model={"pretrained": str(pipeline)}))
    assert cfg.model.pretrained == str(pipeline)
    vae = load_pipeline(pipeline).vae.state_dict()  # the file is real: diffusers loads the same weights
    assert vae.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(vae[key], value, rtol=0, atol=0)


def test_pickles_named_safetensors_are_refused(tmp_path) -> None:
    tensors = {"w": torch.zeros(2, 2)}
    raw = tmp_path / "raw" / "model.safetensors"  # pickle protocol 2..5: starts with 0x80
    zipped = tmp_path / "zipped" / "model.safetensors"  # torch.save: a zip archive
    for path in (raw, zipped):
        path.parent.mkdir()
    for protocol in (2, 4, 5):
        raw.write_bytes(pickle.dumps(tensors, protocol=protocol))
        assert raw.read_bytes()[0] == 0x80
        with pytest.raises(UnsafeFileError, match=r"model.safetensors is a pickle"):
            check_safetensors(raw, "weights")
        with pytest.raises(UnsafeFileError, match=r"model.safetensors is a pickle"):
            check_folder(raw.parent, "weights")
    torch.save(tensors, zipped)
    for check in (check_safetensors, lambda p, what: check_pipeline_folder(p.parent.parent, what)):
        for path in (raw, zipped):
            with pytest.raises(UnsafeFileError, match=r"model.safetensors is a pickle"):
                check(path, "weights")


def test_broken_safetensors_structure_is_not_accepted(tmp_path) -> None:
    """A header that parses but does not describe the file: data cut short, a byte range of the
    wrong size for its dtype and shape, a header that is not a JSON object."""
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4, 4), "b": torch.ones(4)}, str(good))
    assert check_safetensors(good, "weights") == good
    data = good.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])

    def write(name: str, header_obj: object, body: bytes) -> Path:
        raw = json.dumps(header_obj).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        return path

    body = data[8 + header_len :]
    wrong_size = json.loads(json.dumps(header))
    wrong_size["w"]["shape"] = [4, 5]
    for path in (
        write("short.safetensors", header, body[:-4]),
        write("wrong_size.safetensors", wrong_size, body),
        write("list.safetensors", [header], body),
        write("no_offsets.safetensors", {"w": {"dtype": "F32", "shape": [4, 4]}}, body),
    ):
        with pytest.raises(UnsafeFileError, match="not a safetensors file"):
            check_safetensors(path, "weights")


class _RunsCode:
    """What a malicious pickle holds: unpickling it calls os.system."""

    def __reduce__(self):
        return (os.system, ("echo unpickled",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_state_metadata_is_checked_before_it_is_unpickled(tmp_path) -> None:
    """A sharded checkpoint's `.metadata` (torch.distributed.checkpoint's own pickle) is read by a
    restricted unpickler first: only checkpoint metadata classes, and tensor entries only (DCP
    unpickles non-tensor entries with no restriction)."""
    import torch.distributed.checkpoint as dcp

    from svdray.safeload import check_sharded_state

    good = tmp_path / "good"
    dcp.save({"lora/a": torch.ones(2, 3), "optimizer/a/step": torch.tensor(1.0)}, checkpoint_id=str(good))
    assert check_sharded_state(good, "checkpoint") == good

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UnsafeFileError, match="system, which is not checkpoint metadata"):
        check_sharded_state(evil, "checkpoint")

    objects = tmp_path / "objects"
    dcp.save({"lora/a": torch.ones(2), "extra": {"note": "a pickled object"}}, checkpoint_id=str(objects))
    with pytest.raises(UnsafeFileError, match="BytesStorageMetadata"):  # an entry DCP would unpickle
        check_sharded_state(objects, "checkpoint")
