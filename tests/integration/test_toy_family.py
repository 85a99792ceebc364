"""A model family is one folder: a family defined entirely in tests/support/toyfamily (its config
section and rules, a tiny denoiser, its loss), named by the config alone, trains through the
ordinary trainer on real Ray (the worker finds it by importing it)."""

from __future__ import annotations

import math

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from svdray.config import config_from_dict
from svdray.models import family_of
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.tracking import metric_history
from svdray.train.trainer import run_training

TOY = "tests.support.toyfamily.config:ToyFamilyConfig"


def test_a_family_from_outside_svdray_trains(ray_cluster, tmp_path, one_clip_manifest):
    from tests.support.toyfamily.family import ToyFamily, load_denoiser

    pipeline = ToyFamily().save_tiny_pipeline(tmp_path / "toy-pipeline")
    data = {"num_frames": 4, "height": 32, "width": 32, "decode_cpus": 0.5, "decoders": 1}
    cfg = config_from_dict(
        {
            "model": {"family": TOY, "pretrained": str(pipeline)},
            "data": {"manifest": str(one_clip_manifest), **data},
            "toy": {"max_sigma": 0.8},
            "lora": {"rank": 2, "alpha": 2},
            "optim": {"lr": 1e-2},
            "train": {"name": "toy", "max_steps": 2, "checkpoint_every": 2, "cpus_per_worker": 1},
            "sample": {"enabled": False},
            "output_dir": str(tmp_path / "out"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "toy"},
        }
    )
    result = run_training(cfg)

    assert result.metrics["step"] == 2
    losses = metric_history(result.tracking_uri, result.mlflow_run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses)
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["toy.max_sigma"] == "0.8"
    # The LoRA trained (peft starts lora_B at zero) and loads back through the family.
    lora = load_file(str(result.lora_dir / ADAPTER_WEIGHTS))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in lora.items())
    denoiser = family_of(cfg).load_lora(load_denoiser(pipeline), result.lora_dir)
    assert sum("lora_" in name for name, _ in denoiser.named_parameters()) == len(lora)
    assert torch.equal(
        dict(denoiser.named_parameters())["to_q.lora_B.default.weight"], lora["to_q.lora_B.weight"]
    )
