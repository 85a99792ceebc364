"""The ComfyUI/kohya LoRA export maps diffusers' SVD UNet names onto the original network's.

The reference names come from tests/data/svd_unet_original_keys.tsv (every parameter of
Stability AI's VideoUNet as ComfyUI names it, with its shape). Full-size UNets are built on the
meta device, so no weights are allocated and the tests run in seconds on CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from svdray.models.svd.comfy import (
    ORIGINAL_PREFIX,
    comfy_lora_targets,
    diffusers_to_original_key,
    export_comfy_lora,
    save_comfy_lora,
)
from tests.support.paths import DATA

REFERENCE_KEYS = DATA / "svd_unet_original_keys.tsv"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
RANK = 4
ALPHA = 8.0


def _meta_unet() -> UNetSpatioTemporalConditionModel:
    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel()


@pytest.fixture(scope="module")
def reference_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        name, shape = line.split("\t")
        assert name not in shapes, f"duplicate reference key {name}"
        shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def diffusers_shapes() -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _meta_unet().state_dict().items()}


@pytest.fixture(scope="module")
def peft_lora() -> tuple[dict[str, torch.Tensor], set[str]]:
    """peft's LoRA state dict of a meta full-size UNet, and the names of the modules it adapted."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS)
    with torch.device("meta"):
        unet = peft.inject_adapter_in_model(config, UNetSpatioTemporalConditionModel())
    adapted = {
        name for name, module in unet.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    return peft.get_peft_model_state_dict(unet), adapted


def test_reference_data(reference_shapes: dict[str, tuple[int, ...]]) -> None:
    assert len(reference_shapes) == 1428
    assert all(name.startswith(ORIGINAL_PREFIX) for name in reference_shapes)


def test_mapping_is_shape_preserving_bijection(
    diffusers_shapes: dict[str, tuple[int, ...]], reference_shapes: dict[str, tuple[int, ...]]
) -> None:
    mapped = {name: ORIGINAL_PREFIX + diffusers_to_original_key(name) for name in diffusers_shapes}
    assert len(set(mapped.values())) == len(mapped), "two diffusers parameters map to one original"
    assert set(mapped.values()) == set(reference_shapes)
    mismatched = {
        name: (shape, reference_shapes[mapped[name]])
        for name, shape in diffusers_shapes.items()
        if shape != reference_shapes[mapped[name]]
    }
    assert not mismatched


@pytest.mark.parametrize(
    ("diffusers", "original"),
    [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
        (
            "down_blocks.0.resnets.1.temporal_res_block.conv2.weight",
            "input_blocks.2.0.time_stack.out_layers.3.weight",
        ),
        ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
        ("down_blocks.3.resnets.1.spatial_res_block.norm1.weight", "input_blocks.11.0.in_layers.0.weight"),
        (
            "down_blocks.2.attentions.0.temporal_transformer_blocks.0.ff_in.net.0.proj.weight",
            "input_blocks.7.1.time_stack.0.ff_in.net.0.proj.weight",
        ),
        ("mid_block.resnets.1.time_mixer.mix_factor", "middle_block.2.time_mixer.mix_factor"),
        ("mid_block.attentions.0.time_pos_embed.linear_2.weight", "middle_block.1.time_pos_embed.2.weight"),
        (
            "up_blocks.0.resnets.2.spatial_res_block.conv_shortcut.weight",
            "output_blocks.2.0.skip_connection.weight",
        ),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.2.upsamplers.0.conv.bias", "output_blocks.8.2.conv.bias"),
        (
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.weight",
            "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
        ),
        ("conv_out.weight", "out.2.weight"),
    ],
)
def test_mapping_examples(diffusers: str, original: str) -> None:
    assert diffusers_to_original_key(diffusers) == original


def test_peft_lora_export_lands_on_listed_weights(
    peft_lora: tuple[dict[str, torch.Tensor], set[str]],
    diffusers_shapes: dict[str, tuple[int, ...]],
    reference_shapes: dict[str, tuple[int, ...]],
) -> None:
    lora_sd, adapted = peft_lora
    # 16 transformers x (spatial + temporal block) x (8 attention + 2 feed-forward projections)
    assert len(adapted) == 16 * 2 * 10
    assert {re.sub(r"\.lora_[AB]\.weight$", "", key) for key in lora_sd} == adapted

    exported = export_comfy_lora(lora_sd, ALPHA, RANK)
    assert len(exported) == 3 * len(adapted)
    targets = comfy_lora_targets(exported, reference_shapes)

    # Every module comes out exactly once, at the original name of the weight it adapted.
    expected = {ORIGINAL_PREFIX + diffusers_to_original_key(f"{module}.weight") for module in adapted}
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        landed = [target for key, target in targets.items() if key.endswith("." + suffix)]
        assert len(landed) == len(set(landed)) == len(adapted), suffix
        assert set(landed) == expected, suffix

    for key, target in targets.items():
        weight = reference_shapes[target]
        assert len(weight) == 2, f"{key} patches a non-linear weight {target} {weight}"
        tensor = exported[key]
        if key.endswith(".lora_up.weight"):
            assert tuple(tensor.shape) == (weight[0], RANK), key
        elif key.endswith(".lora_down.weight"):
            assert tuple(tensor.shape) == (RANK, weight[1]), key
        else:
            assert tensor.ndim == 0 and tensor.dtype == torch.float32 and tensor.item() == ALPHA, key

    # The same module, seen from the diffusers side, has the same shape.
    for module in adapted:
        target = ORIGINAL_PREFIX + diffusers_to_original_key(f"{module}.weight")
        assert diffusers_shapes[f"{module}.weight"] == reference_shapes[target]


def _small_lora() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q"
    return {
        f"{base}.lora_A.weight": torch.randn(RANK, 320, generator=generator),
        f"{base}.lora_B.weight": torch.randn(320, RANK, generator=generator),
    }


def test_export_keeps_values() -> None:
    lora_sd = _small_lora()
    exported = export_comfy_lora(lora_sd, ALPHA, RANK)
    name = "lora_unet_input_blocks_1_1_time_stack_0_attn1_to_q"
    assert set(exported) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    base = "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q"
    assert torch.equal(exported[f"{name}.lora_down.weight"], lora_sd[f"{base}.lora_A.weight"])
    assert torch.equal(exported[f"{name}.lora_up.weight"], lora_sd[f"{base}.lora_B.weight"])
    assert exported[f"{name}.alpha"].item() == ALPHA


def test_save_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_comfy_lora(_small_lora(), ALPHA, RANK, path, metadata={"svdray_run": "abc"})
    loaded = load_file(str(path))
    expected = export_comfy_lora(_small_lora(), ALPHA, RANK)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["svdray_run"] == "abc"
    assert metadata["ss_network_dim"] == str(RANK)


@pytest.mark.parametrize(
    "name",
    [
        "foo.weight",
        "conv_in.lora_A.weight",
        "down_blocks.3.attentions.0.proj_in.weight",  # the lowest down level has no attention
        "down_blocks.3.downsamplers.0.conv.weight",
        "down_blocks.0.resnets.2.spatial_res_block.conv1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "mid_block.attentions.1.proj_in.weight",
        "up_blocks.0.attentions.0.proj_in.weight",
        "up_blocks.3.upsamplers.0.conv.weight",
        "up_blocks.4.resnets.0.spatial_res_block.conv1.weight",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn3.to_q.weight",
    ],
)
def test_unknown_key_raises(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        diffusers_to_original_key(name)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q.lora_A.weight", (RANK, 320)),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight", (RANK, 320)),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector", (320,)),
    ],
)
def test_export_unknown_key_raises(key: str, shape: tuple[int, ...]) -> None:
    module = key.split(".lora_")[0]
    lora_sd = {key: torch.zeros(shape), f"{module}.lora_B.weight": torch.zeros(320, RANK)}
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        export_comfy_lora(lora_sd, ALPHA, RANK)


def test_export_rejects_incomplete_or_wrong_rank() -> None:
    lora_sd = _small_lora()
    half = {k: v for k, v in lora_sd.items() if "lora_A" in k}
    with pytest.raises(ValueError, match="lora_B"):
        export_comfy_lora(half, ALPHA, RANK)
    with pytest.raises(ValueError, match="rank"):
        export_comfy_lora(lora_sd, ALPHA, RANK * 2)


def test_targets_reject_unlisted_key(reference_shapes: dict[str, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError, match="lora_unet_input_blocks_1_1_nothing"):
        comfy_lora_targets(["lora_unet_input_blocks_1_1_nothing.lora_up.weight"], reference_shapes)
