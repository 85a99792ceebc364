from __future__ import annotations

import json

import peft
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from safetensors.torch import load_file

from svdray.config import LoraConfig
from svdray.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_lora, save_lora
from svdray.models.svd.lora import add_lora


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, 8, 8, 16, 16, generator=g),
        timestep=torch.tensor([0.3]),
        encoder_hidden_states=torch.randn(1, 1, 32, generator=g),
        added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]),
    )


def adapted_modules(unet) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A" in n}


def test_only_lora_parameters_train(tiny_pipeline_dir):
    unet = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    add_lora(unet, LoraConfig(rank=4, alpha=4))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in unet.parameters() if not p.requires_grad) > 1_000_000


@pytest.mark.parametrize(
    ("blocks", "feed_forward", "expect_spatial", "expect_temporal", "expect_ff"),
    [
        (["spatial"], False, True, False, False),
        (["temporal"], True, False, True, True),
        (["spatial", "temporal"], False, True, True, False),
    ],
)
def test_module_selection(
    tiny_pipeline_dir, blocks, feed_forward, expect_spatial, expect_temporal, expect_ff
):
    unet = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    add_lora(unet, LoraConfig(rank=2, alpha=2, blocks=blocks, feed_forward=feed_forward))
    names = adapted_modules(unet)
    assert any(".transformer_blocks." in n for n in names) == expect_spatial
    assert any(".temporal_transformer_blocks." in n for n in names) == expect_temporal
    assert any(".ff.net." in n for n in names) == expect_ff
    assert all(n.split(".")[-1] in {"to_q", "to_k", "to_v", "0", "proj", "2"} for n in names)


def test_save_load_round_trip_with_peft_alone(tiny_pipeline_dir, tmp_path):
    cfg = LoraConfig(rank=4, alpha=8)
    trained = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    add_lora(trained, cfg)
    with torch.no_grad():  # stand-in for training: make lora_B non-zero so the adapter matters
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_lora(trained, tmp_path / "lora")
    weights = load_file(str(tmp_path / "lora" / ADAPTER_WEIGHTS))
    assert weights and not any(".default" in k for k in weights)
    assert json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["r"] == 4

    base = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    with torch.no_grad():
        base_out = base(**unet_inputs()).sample

    # A user with only diffusers + peft + safetensors:
    fresh = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "lora"))
    peft.inject_adapter_in_model(config, fresh)
    peft.set_peft_model_state_dict(fresh, weights)

    ours = load_lora(StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet, tmp_path / "lora")
    with torch.no_grad():
        expected = trained(**unet_inputs()).sample
        torch.testing.assert_close(fresh(**unet_inputs()).sample, expected)
        torch.testing.assert_close(ours(**unet_inputs()).sample, expected)
    assert (expected - base_out).abs().max() > 1e-3  # and the adapter really changes the output


def test_load_lora_refuses_missing_weights(tiny_pipeline_dir, tmp_path):
    unet = StableVideoDiffusionPipeline.from_pretrained(tiny_pipeline_dir).unet
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_lora(unet, tmp_path)
