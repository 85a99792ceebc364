"""The latent cache on a real cluster: `svdray cache`, keys that miss on every change that matters,
and training that reads it."""

from __future__ import annotations

import dataclasses
import os
import shutil

from mlflow.tracking import MlflowClient

from svdray import cli
from svdray.config import DataConfig, ModelConfig, load_config
from svdray.data.cache import lookup_cache
from svdray.data.manifest import write_manifest
from svdray.models.svd.cache import SVD_CACHE
from svdray.train.trainer import resolve_paths, shared_training_dataset
from tests.support.clips import ffmpeg_clip


def test_cache_command_then_training_reads_it(
    ray_cluster, tmp_path, square_clip, write_config, capsys, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # exported by earlier runs' set_tracking_uri
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(square_clip, clips / "a.mp4")
    ffmpeg_clip(clips / "b.mp4", 80, 48, 2, 25)
    manifest = write_manifest([{"video": "clips/a.mp4"}, {"video": "clips/b.mp4"}], tmp_path / "m.jsonl")
    cache_dir = tmp_path / "cache"
    path = write_config(
        manifest,
        data={"cache": True, "cache_dir": str(cache_dir), "start": "random"},
        svd={"motion_bucket_id": None},
        train={"name": "cached", "max_steps": 3, "checkpoint_every": 3},
    )
    assert cli.main(["cache", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "hits:         0" in printed and "computed:     2" in printed
    shards = list(cache_dir.rglob("*"))
    assert shards and all(p.suffix == ".safetensors" for p in shards if p.is_file())

    # What misses and what hits, without computing anything.
    cfg = load_config(path)
    rows = [{"video": str(clips / n), "clip_id": n} for n in ("a.mp4", "b.mp4")]

    def misses(data: DataConfig, model: ModelConfig = cfg.model, encoder=SVD_CACHE, rows=rows) -> int:
        return len(lookup_cache(rows, data, model, encoder).missing())

    assert misses(cfg.data) == 0  # a re-run, or a Tune trial changing lr or rank
    assert misses(cfg.data, encoder=dataclasses.replace(SVD_CACHE, version="svd-2")) == 2
    edited = [{**rows[0], "prompt": "a dog"}, rows[1]]
    assert misses(cfg.data, rows=edited) == 0  # SVD ignores prompts: its entries stay valid
    assert misses(cfg.data, encoder=dataclasses.replace(SVD_CACHE, uses_prompts=True), rows=edited) == 2
    assert misses(dataclasses.replace(cfg.data, num_frames=6)) == 2
    assert misses(dataclasses.replace(cfg.data, crop="random")) == 2
    assert misses(cfg.data, dataclasses.replace(cfg.model, frozen_dtype="bfloat16")) == 2
    stat = os.stat(clips / "b.mp4")
    os.utime(clips / "b.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert misses(cfg.data) == 1
    os.utime(clips / "b.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert cli.main(["train", "--config", str(path)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["data.cache_hits"] == "2" and tags["data.cache_computed"] == "0"
    assert tags["data.samples_fed"] == "3" and tags["data.decode_failures"] == "0"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3

    # The stream a Tune sweep shares between its trials reads the cache too.
    example = shared_training_dataset(resolve_paths(cfg)).take(1)[0]
    assert {"latent_mean", "latent_std", "image_embedding", "motion"} <= set(example)
    assert "video" not in example
