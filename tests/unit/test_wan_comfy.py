"""Wan parameter names: diffusers <-> original Wan (ComfyUI), checked against diffusers' own
single-file converter on the full-size transformers built on the meta device."""

from __future__ import annotations

import peft
import pytest
import torch
import yaml
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from svdray import cli
from svdray.models.lora import ADAPTER_WEIGHTS, lora_state_dict
from svdray.models.wan import lora as wan_lora
from svdray.models.wan import pipeline as wan_pipeline
from svdray.models.wan.comfy import comfy_lora_state_dict, to_diffusers_name, to_original_name


@pytest.fixture(scope="module", params=["Wan2.1-I2V-14B", "Wan2.2-TI2V-5B", "Wan2.2-I2V-A14B"])
def full_size(request):
    model = wan_pipeline.meta_transformer(request.param)
    return request.param, dict(model.named_parameters())


def test_full_size_shapes(full_size):
    name, params = full_size
    total = sum(p.numel() for p in params.values())
    # Published sizes: 14B (Wan2.1 I2V, with CLIP projections; one A14B expert) and 5B (TI2V).
    expected = {"Wan2.1-I2V-14B": 16.4e9, "Wan2.2-TI2V-5B": 5.0e9, "Wan2.2-I2V-A14B": 14.3e9}[name]
    assert abs(total - expected) / expected < 0.03, total


def test_names_map_one_to_one_and_diffusers_converts_them_back(full_size):
    name, params = full_size
    original = {to_original_name(k): v for k, v in params.items()}
    assert len(original) == len(params)  # injective
    assert not any(k.startswith(("condition_embedder", "attn1", "attn2")) for k in original)
    # diffusers' own loader for original Wan checkpoints turns every name back into ours.
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    converted = convert_wan_transformer_to_diffusers(checkpoint)
    assert set(converted) == set(params)
    for key, value in converted.items():
        assert value.shape == params[key].shape, key
    # ...and the inverse here agrees with it, with or without ComfyUI's prefix.
    for orig in original:
        assert to_original_name(to_diffusers_name(orig)) == orig
        assert to_diffusers_name(f"diffusion_model.{orig}") == to_diffusers_name(orig)


def test_original_names_are_wans():
    assert to_original_name("blocks.3.attn1.to_out.0.weight") == "blocks.3.self_attn.o.weight"
    assert to_original_name("blocks.0.attn2.add_k_proj.bias") == "blocks.0.cross_attn.k_img.bias"
    assert to_original_name("blocks.0.norm2.weight") == "blocks.0.norm3.weight"
    assert to_original_name("blocks.7.scale_shift_table") == "blocks.7.modulation"
    assert to_original_name("scale_shift_table") == "head.modulation"
    assert to_original_name("proj_out.weight") == "head.head.weight"
    with pytest.raises(ValueError, match="not a parameter name"):
        to_original_name("blocks.0.attn1.to_qq.weight")
    with pytest.raises(ValueError, match="not a parameter name"):
        to_diffusers_name("blocks.0.self_attn.qq.weight")


def test_lora_export_uses_comfy_keys():
    pipe = wan_pipeline.build_tiny_wan_pipeline("i2v")
    wan_lora.add_wan_lora(pipe.transformer, rank=4, alpha=8.0, feed_forward=True)
    lora = lora_state_dict(pipe.transformer)
    exported = comfy_lora_state_dict({f"transformer.{k}": v for k, v in lora.items()}, alpha=8.0, rank=4)
    assert len(exported) == len(lora) // 2 * 3
    assert torch.equal(
        exported["diffusion_model.blocks.1.cross_attn.v_img.lora_B.weight"],
        lora["blocks.1.attn2.add_v_proj.lora_B.weight"],
    )
    assert exported["diffusion_model.blocks.0.ffn.2.alpha"].item() == 8.0
    # Every exported module is a linear layer of the original model.
    originals = {
        to_original_name(n)
        for n, _ in wan_pipeline.build_tiny_wan_pipeline("i2v").transformer.named_parameters()
    }
    for key in exported:
        module = key.removeprefix("diffusion_model.").split(".lora_")[0].removesuffix(".alpha")
        assert f"{module}.weight" in originals, key
    with pytest.raises(ValueError, match="rank"):
        comfy_lora_state_dict(lora, alpha=8.0, rank=8)
    with pytest.raises(ValueError, match="incomplete"):
        comfy_lora_state_dict({k: v for k, v in lora.items() if "lora_B" not in k}, alpha=8.0, rank=4)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        comfy_lora_state_dict(
            {"blocks.0.attn1.to_q.weight": lora["blocks.0.attn1.to_q.lora_A.weight"]}, 8.0, 4
        )


def _run_folder(tmp_path, lora: dict[str, torch.Tensor], config: peft.LoraConfig):
    """A training output_dir as `svdray train` leaves it: lora/ (peft's files) and config.yaml."""
    out = tmp_path / "run"
    (out / "lora").mkdir(parents=True)
    save_file(lora, str(out / "lora" / ADAPTER_WEIGHTS))
    config.save_pretrained(str(out / "lora"))
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "wan", "pretrained": "x"}}))
    return out


def test_cli_comfy_export_of_a_full_size_wan_lora(tmp_path):
    """`svdray export --format comfy` of a run's LoRA on the full-size Wan2.2-TI2V-5B transformer
    (built on the meta device; the LoRA weights are real random tensors of peft's shapes): every
    key is `diffusion_model.<original Wan name>.lora_A/B.weight` or `.alpha`, and every module
    it names is a linear layer of the original model with the LoRA's shapes."""
    transformer = wan_pipeline.meta_transformer("Wan2.2-TI2V-5B")
    config = wan_lora.add_wan_lora(transformer, rank=8, alpha=16.0, feed_forward=True)
    generator = torch.Generator().manual_seed(0)
    lora = {
        key: torch.randn(tensor.shape, generator=generator)
        for key, tensor in peft.get_peft_model_state_dict(transformer).items()
    }
    run = _run_folder(tmp_path, lora, config)
    out = tmp_path / "wan_lora.safetensors"
    assert cli.main(["export", "--run", str(run), "--format", "comfy", "--out", str(out)]) == 0
    exported = load_file(str(out))
    assert len(exported) == len(lora) // 2 * 3 and len(lora) == 30 * 10 * 2  # 30 blocks x 10 linears
    originals = {
        to_original_name(n.replace(".base_layer", "")): p.shape
        for n, p in transformer.named_parameters()
        if "lora_" not in n
    }
    for key, tensor in exported.items():
        assert key.startswith("diffusion_model.blocks."), key
        module, _, part = key.removeprefix("diffusion_model.").rpartition(".")
        if part == "alpha":
            assert tensor.item() == 16.0
            continue
        module = module.removesuffix(".lora_A").removesuffix(".lora_B")
        out_features, in_features = originals[f"{module}.weight"]
        assert tensor.shape == ((8, in_features) if ".lora_A." in key else (out_features, 8)), key
    name = "blocks.3.attn1.to_q"
    assert torch.equal(
        exported["diffusion_model.blocks.3.self_attn.q.lora_A.weight"], lora[f"{name}.lora_A.weight"]
    )


def test_cli_comfy_export_refuses_a_tiny_wan_lora(tmp_path, capsys):
    pipe = wan_pipeline.build_tiny_wan_pipeline("i2v")
    config = wan_lora.add_wan_lora(pipe.transformer, rank=4, alpha=4.0)
    run = _run_folder(tmp_path, lora_state_dict(pipe.transformer), config)
    out = tmp_path / "tiny.safetensors"
    assert cli.main(["export", "--run", str(run), "--format", "comfy", "--out", str(out)]) == 2
    assert "another layout" in capsys.readouterr().err
    assert not out.exists()
