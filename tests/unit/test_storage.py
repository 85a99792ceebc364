"""svdray.storage without a server: URIs and paths, relative resolution against a manifest's URI,
the environment's settings turned into the filesystem Ray and svdray use (the form in which it is
pickled to workers), and the start-up check's answers where nothing answers: a closed port, and
an s3:// or gs:// path with no endpoint and no credentials on this offline machine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from svdray import storage
from svdray.cli import main
from svdray.config import ConfigError, config_from_dict
from svdray.data.manifest import BAD_VALUE, RowError, normalize_row
from svdray.storage import StorageError, StorageSettings
from tests.support.servers import free_port


def test_uris_and_paths(tmp_path: Path) -> None:
    assert storage.scheme("s3://b/k") == "s3" and storage.scheme("gs://b/k") == "gs"
    assert storage.scheme("/data/x.mp4") == "" and storage.scheme("file:///data/x.mp4") == ""
    with pytest.raises(StorageError, match=r"http:// .*local paths, s3:// and gs://"):
        storage.scheme("http://host/x.mp4")
    assert storage.is_remote("s3://b/k") and not storage.is_remote("file:///x") and not storage.is_remote("")
    assert storage.normalize("s3://b//data/./clips/") == "s3://b/data/clips"
    assert storage.normalize("file:///tmp/a/../b") == "/tmp/b"
    assert storage.join("s3://b/data", "clips", "a.mp4") == "s3://b/data/clips/a.mp4"
    assert storage.parent("gs://b/data/train.jsonl") == "gs://b/data"
    assert storage.basename("s3://b/data/train.jsonl") == "train.jsonl"
    assert storage.bucket("s3://b/data/train.jsonl") == "b"
    assert storage.with_scheme("b/ray/run/step_2", "s3://b/ray") == "s3://b/ray/run/step_2"
    assert storage.with_scheme("/local/ray/run", "/local/ray") == "/local/ray/run"
    # Relative paths resolve against the manifest's folder, a bucket's or a local one.
    assert storage.resolve("clips/a.mp4", "s3://b/data") == "s3://b/data/clips/a.mp4"
    assert storage.resolve("../other/a.mp4", "s3://b/data") == "s3://b/other/a.mp4"
    assert storage.resolve("gs://c/a.mp4", "s3://b/data") == "gs://c/a.mp4"
    assert storage.resolve("/abs/a.mp4", "s3://b/data") == "/abs/a.mp4"
    assert storage.resolve("a.mp4", tmp_path) == str(tmp_path / "a.mp4")


def test_manifest_rows_resolve_against_the_manifest_uri() -> None:
    row = normalize_row({"video": "clips/a.mp4", "image": "s3://c/a.png"}, "s3://b/data", "train.jsonl:1")
    assert row["video"] == "s3://b/data/clips/a.mp4" and row["image"] == "s3://c/a.png"
    with pytest.raises(RowError, match="s3:// and gs://") as err:
        normalize_row({"video": "https://example.com/a.mp4"}, "s3://b/data", "train.jsonl:2")
    assert err.value.reason == BAD_VALUE


def reduced(fs: pafs.FileSystem) -> dict:
    """The options a filesystem is pickled with: what a Ray worker rebuilds it from."""
    return fs.__reduce__()[1][0]


def test_settings_make_the_filesystem() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://fallback:1",
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "eu-west-1",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023",
        "SVDRAY_STORAGE_TIMEOUT_S": "7",
        "UNRELATED": "x",
        "AWS_SESSION_TOKEN": "",  # empty is unset
    }
    settings = StorageSettings.from_env(env)
    assert settings == StorageSettings(
        s3_endpoint="http://minio:9000",
        access_key="key",
        secret_key="secret",
        region="eu-west-1",
        gcs_emulator="http://127.0.0.1:9023",
        timeout_s=7.0,
    )
    fs, inner = storage.filesystem("s3://bucket/ray/run", settings)
    assert isinstance(fs, pafs.S3FileSystem) and inner == "bucket/ray/run"
    options = reduced(fs)
    assert options["endpoint_override"] == "http://minio:9000" and options["region"] == "eu-west-1"
    assert (options["access_key"], options["secret_key"], options["session_token"]) == ("key", "secret", "")
    gcs, inner = storage.filesystem("gs://bucket/cache", settings)
    assert isinstance(gcs, pafs.GcsFileSystem) and inner == "bucket/cache"
    options = reduced(gcs)
    assert (options["endpoint_override"], options["scheme"], options["anonymous"]) == (
        "127.0.0.1:9023",
        "http",
        True,
    )
    local, inner = storage.filesystem("file:///tmp/x/../y", settings)
    assert isinstance(local, pafs.LocalFileSystem) and inner == "/tmp/y"
    # Without keys, AWS's own chain (profile, instance role); without a region, us-east-1.
    bare = reduced(storage.filesystem("s3://b/k", StorageSettings.from_env({}))[0])
    assert (bare["access_key"], bare["endpoint_override"], bare["region"]) == (None, "", "us-east-1")
    assert storage.runtime_env_vars(env) == {k: v for k, v in env.items() if v and k != "UNRELATED"}
    # In a submitted job, what its runtime environment sets already reaches every worker.
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}}}
    forwarded = storage.runtime_env_vars({**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)})
    assert "AWS_ENDPOINT_URL_S3" not in forwarded and forwarded["AWS_ACCESS_KEY_ID"] == "key"
    with pytest.raises(StorageError, match="SVDRAY_STORAGE_TIMEOUT_S"):
        StorageSettings.from_env({"SVDRAY_STORAGE_TIMEOUT_S": "soon"})


def test_ray_gets_bucket_paths_without_the_scheme(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    path, fs = storage.ray_storage("s3://bucket/ray/")
    assert path == "bucket/ray" and reduced(fs)["endpoint_override"] == "http://minio:9000"
    assert storage.ray_storage(tmp_path / "ray") == (str(tmp_path / "ray"), None)


def test_local_helpers_round_trip(tmp_path: Path) -> None:
    target = storage.write_bytes(tmp_path / "a" / "b.bin", b"data")
    assert Path(target).read_bytes() == b"data" and list((tmp_path / "a").iterdir()) == [Path(target)]
    assert storage.list_files(tmp_path / "a", ".bin") == [target] and storage.list_files(tmp_path / "x") == []
    with storage.local_copy(tmp_path / "a") as local:
        assert local == tmp_path / "a"
    storage.check(tmp_path / "missing", "data.manifest")  # local paths: their own checks name them


def offline(**extra: str) -> StorageSettings:
    return StorageSettings.from_env({"SVDRAY_STORAGE_TIMEOUT_S": "6", **extra})


def timed_check(uri: str, key: str, settings: StorageSettings) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check(uri, key, settings=settings)
    return str(err.value), time.monotonic() - started


def test_an_unreachable_endpoint_is_named_at_once() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    message, took = timed_check(
        "s3://bucket/train.jsonl", "data.manifest", offline(AWS_ENDPOINT_URL_S3=closed, AWS_ACCESS_KEY_ID="k")
    )
    assert message.startswith(f"data.manifest: s3://bucket/train.jsonl: cannot reach {closed}"), message
    assert took < 6
    message, took = timed_check(
        "gs://bucket/cache", "data.cache_dir", offline(STORAGE_EMULATOR_HOST=closed.split("//")[1])
    )
    assert message.startswith("data.cache_dir: gs://bucket/cache: cannot reach 127.0.0.1:"), message
    assert took < 6


@pytest.mark.parametrize("uri", ["s3://bucket/ray", "gs://bucket/ray"])
def test_no_endpoint_and_no_credentials_fail_within_the_timeout(uri: str) -> None:
    """Offline, s3:// tries AWS itself and gs:// looks for Google's default credentials (which
    pyarrow would retry for 15 minutes): either way an answer naming the key within the timeout."""
    message, took = timed_check(uri, "train.storage_path", offline())
    assert message.startswith(f"train.storage_path: {uri}: "), message
    where = "AWS S3" if uri.startswith("s3") else "Google Cloud Storage (STORAGE_EMULATOR_HOST unset)"
    assert where in message
    assert took < 6 + 1


def test_a_bad_uri_stops_the_command_before_anything_starts(tmp_path, monkeypatch, capsys) -> None:
    """`svdray train` exits 2 naming the key and the URI: config validation checks every URI."""
    import yaml

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SVDRAY_STORAGE_TIMEOUT_S", "6")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"manifest": "s3://bucket/train.jsonl"}}))
    started = time.monotonic()
    assert main(["train", "--config", str(config)]) == 2
    assert time.monotonic() - started < 30
    assert "config error: data.manifest: s3://bucket/train.jsonl: cannot reach" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"mlflow.artifact_location: .*s3://"):
        config_from_dict(
            {"data": {"manifest": str(config)}, "mlflow": {"artifact_location": "gs://b/mlflow"}},
            check_files=True,
        )
