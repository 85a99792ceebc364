"""Local paths and object-storage URIs (s3://, gs://): one way to open them.

Every path svdray reads or writes (manifests, clips, images, latent cache shards, checkpoints,
resume folders, exported runs) may be a local path (or `file://`), `s3://bucket/key` (AWS S3
or any S3-compatible server: MinIO, Ceph, R2, ...) or `gs://bucket/key` (Google Cloud
Storage). `filesystem(path)` turns it into a pyarrow filesystem and the path inside it; Ray
Train, Ray Tune and Ray Data take that pair (`ray_storage`: Ray wants `bucket/key`, without the
scheme, next to the filesystem object), and svdray's own reads and writes go through the
helpers below, which take paths and URIs alike.

Settings come from the environment, under the names the cloud tools use:

    S3   AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL)  an S3-compatible server, e.g. http://minio:9000;
                                                   unset: AWS itself
         AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   (and AWS_SESSION_TOKEN); unset: AWS's default
                                                   chain (~/.aws profile, instance role)
         AWS_DEFAULT_REGION (or AWS_REGION)         the buckets' region (default us-east-1)
    GCS  GOOGLE_APPLICATION_CREDENTIALS, or the VM's service account (Google's default credentials)
         STORAGE_EMULATOR_HOST                      a GCS emulator, e.g. http://127.0.0.1:9023
                                                   (anonymous access: emulators take no credentials)
         SVDRAY_STORAGE_TIMEOUT_S                   how long the start-up check waits for an answer
                                                   (default 20)

Ray workers see them through the run's runtime environment (`runtime_env_vars`, which
`svdray.train.trainer.init_ray` passes to `ray.init`; jobs/runtime_env.yaml for `ray job submit`).

`check` is the start-up check (config validation calls it for every URI key): an unreachable
endpoint, wrong credentials, a missing bucket or object give an error naming the config key and
the URI within the timeout, before anything starts. pyarrow alone would wait: a `gs://` path
without reachable credentials keeps retrying (still waiting after 40 s on an offline machine),
an `s3://` path without an endpoint tries AWS itself for seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs")
# The environment a process needs to reach the buckets: what `runtime_env_vars` hands to Ray's
# workers (MLFLOW_S3_ENDPOINT_URL: MLflow's own S3 client, see README "Running on a cluster").
SETTINGS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "SVDRAY_STORAGE_TIMEOUT_S",
    "MLFLOW_S3_ENDPOINT_URL",
)
DEFAULT_TIMEOUT_S = 20.0


class StorageError(ValueError):
    """A path or URI that cannot be used: which config key (or flag), which URI, and why."""


# --------------------------------------------------------------------------------------------
# Paths and URIs


def scheme(path: str | Path) -> str:
    """The scheme of an object-storage URI ("s3", "gs"), "" for a local path (or file://);
    StorageError for any other scheme (http://, ...)."""
    text = str(path)
    if "://" not in text:
        return ""
    name = text.split("://", 1)[0].lower()
    if name == "file":
        return ""
    if name not in REMOTE_SCHEMES:
        raise StorageError(
            f"{text}: unsupported scheme {name}:// (svdray reads local paths, s3:// and gs://)"
        )
    return name


def is_remote(path: str | Path | None) -> bool:
    """An s3:// or gs:// URI (not a local path)."""
    return bool(path) and "://" in str(path) and scheme(path) != ""


def normalize(path: str | Path) -> str:
    """A local path made absolute (`~` expanded, symbolic links kept: the name the user gave), a
    `file://` URI as its local path, an object URI as `scheme://bucket/key` without a trailing /."""
    text = str(path)
    if is_remote(text):
        name, rest = text.split("://", 1)
        rest = posixpath.normpath(rest.strip("/")) if rest.strip("/") else ""
        return f"{name.lower()}://{rest}"
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return os.path.abspath(os.path.expanduser(text))


def absolute(path: str | Path) -> str:
    """What a config key holds once a run resolves it (workers run in other folders): an object
    URI normalized, a local path absolute with symbolic links resolved."""
    return normalize(path) if is_remote(path) else str(Path(normalize(path)).resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base`/`parts`, for a local folder or an object URI."""
    if is_remote(base):
        return normalize(posixpath.join(str(base), *parts))
    return os.path.join(str(base), *parts)


def parent(path: str | Path) -> str:
    """The folder `path` is in (an object URI's parent "folder" is its key prefix)."""
    path = normalize(path)
    if is_remote(path):
        name, rest = path.split("://", 1)
        return f"{name}://{posixpath.dirname(rest)}"
    return os.path.dirname(path)


def basename(path: str | Path) -> str:
    return posixpath.basename(normalize(path)) if is_remote(path) else os.path.basename(str(path))


def resolve(path: str, base: str | Path) -> str:
    """`path` as a manifest row gives it: an object URI or absolute path as it is, a relative path
    against the manifest's folder `base` (a local folder or an object URI)."""
    if "://" in path:
        return normalize(path)
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return os.path.abspath(expanded)
    return join(base, expanded) if is_remote(base) else os.path.abspath(os.path.join(str(base), expanded))


def bucket(path: str | Path) -> str:
    """The bucket of an object URI."""
    return normalize(path).split("://", 1)[1].split("/", 1)[0]


# --------------------------------------------------------------------------------------------
# Settings and filesystems


@dataclass(frozen=True)
class StorageSettings:
    """Where the buckets are and how to sign in, from the environment (see the module docstring)."""

    s3_endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    region: str | None = None
    gcs_emulator: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        env = os.environ if env is None else env

        def get(*names: str) -> str | None:
            return next((env[n] for n in names if env.get(n)), None)  # an empty value is unset

        timeout = get("SVDRAY_STORAGE_TIMEOUT_S")
        try:
            timeout_s = float(timeout) if timeout else DEFAULT_TIMEOUT_S
        except ValueError:
            raise StorageError(f"SVDRAY_STORAGE_TIMEOUT_S: expected seconds, got {timeout!r}") from None
        return cls(
            s3_endpoint=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            access_key=get("AWS_ACCESS_KEY_ID"),
            secret_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            region=get("AWS_DEFAULT_REGION", "AWS_REGION"),
            gcs_emulator=get("STORAGE_EMULATOR_HOST"),
            timeout_s=timeout_s,
        )

    def endpoint(self, name: str) -> str:
        """Where requests for scheme `name` go, as an error message names it."""
        if name == "s3":
            return self.s3_endpoint or f"AWS S3 ({self.region or 'us-east-1'}; AWS_ENDPOINT_URL_S3 unset)"
        return self.gcs_emulator or "Google Cloud Storage (STORAGE_EMULATOR_HOST unset)"


def _s3(settings: StorageSettings, check: bool) -> pafs.FileSystem:
    options: dict[str, Any] = {"region": settings.region or "us-east-1"}
    if settings.s3_endpoint:
        options["endpoint_override"] = settings.s3_endpoint
    if settings.access_key and settings.secret_key:
        options.update(access_key=settings.access_key, secret_key=settings.secret_key)
        if settings.session_token:
            options["session_token"] = settings.session_token
    if check:  # the start-up check: one short try, so that it answers within its timeout
        options.update(
            connect_timeout=min(5.0, settings.timeout_s),
            request_timeout=settings.timeout_s / 2,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
    return pafs.S3FileSystem(**options)


def _gcs(settings: StorageSettings, check: bool) -> pafs.FileSystem:
    options: dict[str, Any] = {}
    if settings.gcs_emulator:
        host = settings.gcs_emulator
        options["scheme"] = "https" if host.startswith("https://") else "http"
        options["endpoint_override"] = host.split("://", 1)[-1].rstrip("/")
        options["anonymous"] = True
    if check:  # without it, missing credentials are retried far beyond the check's timeout
        options["retry_time_limit"] = datetime.timedelta(seconds=settings.timeout_s / 2)
    return pafs.GcsFileSystem(**options)


@functools.lru_cache(maxsize=16)
def _filesystem(name: str, settings: StorageSettings, check: bool) -> pafs.FileSystem:
    if name == "s3":
        return _s3(settings, check)
    if name == "gs":
        return _gcs(settings, check)
    return pafs.LocalFileSystem()


def filesystem(path: str | Path, settings: StorageSettings | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an object URI: `bucket/key`
    without the scheme for an object, the absolute path for a local file."""
    path = normalize(path)
    name = scheme(path)
    fs = _filesystem(name, settings or StorageSettings.from_env(), False)
    return fs, path.split("://", 1)[1] if name else path


def ray_storage(path: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """`storage_path` and `storage_filesystem` for Ray Train's and Tune's RunConfig: a local
    path as it is (Ray's own local filesystem), an object URI as `bucket/key` and its filesystem."""
    if not is_remote(path):
        return normalize(path), None
    fs, inner = filesystem(path)
    return inner, fs


def with_scheme(inner: str, like: str | Path) -> str:
    """A path Ray returned without the scheme (`Result.path`, `Checkpoint.path`) as a URI again,
    in the scheme of `like` (the storage path it came from)."""
    if not is_remote(like):
        return inner
    return f"{scheme(like)}://{inner.lstrip('/')}"


def runtime_env_vars(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The storage settings set in `env` (default: this process's), for Ray's runtime environment,
    less those a submitted job's own runtime environment sets (they reach the workers already, and
    Ray refuses to merge a variable that both set)."""
    env = os.environ if env is None else env
    job = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by `ray job submit`
    given = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {name: env[name] for name in SETTINGS_ENV if env.get(name) and name not in given}


# --------------------------------------------------------------------------------------------
# Reading and writing


def info(path: str | Path) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def exists(path: str | Path) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    return info(path).type == pafs.FileType.Directory


def mtime_ns(file_info: pafs.FileInfo) -> int:
    """A file's modification time in ns (0 where the store has none)."""
    return int(file_info.mtime_ns or 0)


def read_bytes(path: str | Path) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def open_input(path: str | Path) -> Iterator[Any]:
    """A seekable binary file (pyarrow's random-access file: read, seek, tell, size, read_at)."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as f:
        yield f


@contextlib.contextmanager
def open_text(path: str | Path, **options: Any) -> Iterator[io.TextIOWrapper]:
    """A text stream of a file or object (`options` as for `open`: encoding, errors, newline)."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as raw, io.TextIOWrapper(raw, **options) as text:
        yield text


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write `data` whole or not at all: a local file through a temporary name renamed into
    place; an object in one upload (it appears only once complete)."""
    path = normalize(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)
    return path


def list_files(folder: str | Path, suffix: str = "") -> list[str]:
    """The files directly in `folder` whose names end in `suffix`, sorted, as paths or URIs of the
    folder's kind; none for a missing folder."""
    folder = normalize(folder)
    fs, inner = filesystem(folder)
    selector = pafs.FileSelector(inner, recursive=False, allow_not_found=True)
    found = [
        join(folder, posixpath.basename(entry.path))
        for entry in fs.get_file_info(selector)
        if entry.type == pafs.FileType.File and entry.path.endswith(suffix)
    ]
    return sorted(found)


def upload(local_dir: str | Path, destination: str | Path) -> str:
    """Copy a local folder to `destination` (a folder or a prefix in a bucket), replacing what is
    there."""
    destination = normalize(destination)
    fs, inner = filesystem(destination)
    if is_remote(destination):
        fs.delete_dir_contents(inner, missing_dir_ok=True)
    else:
        shutil.rmtree(inner, ignore_errors=True)
        fs.create_dir(inner)
    pafs.copy_files(str(local_dir), inner, pafs.LocalFileSystem(), fs)
    return destination


def download(source: str | Path, local_dir: str | Path) -> Path:
    """Copy a folder (or a single file into the folder) from a bucket to `local_dir`."""
    fs, inner = filesystem(source)
    local_dir = Path(local_dir)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{normalize(source)}: not found")
    if kind == pafs.FileType.File:
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(inner, str(local_dir / basename(source)), fs, pafs.LocalFileSystem())
    else:
        local_dir.mkdir(parents=True, exist_ok=True)  # pyarrow copies into it, it does not make it
        pafs.copy_files(inner, str(local_dir), fs, pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """A local folder or file to read `path` from: a local path as it is, an object URI (a folder
    or a file) copied into a temporary folder, deleted afterwards."""
    if not is_remote(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="svdray-download-") as tmp:
        kind = info(path).type
        if kind == pafs.FileType.File:
            download(path, tmp)
            yield Path(tmp) / basename(path)
        else:
            yield download(path, Path(tmp) / (basename(path) or "root"))


# --------------------------------------------------------------------------------------------
# The start-up check


def _classify(err: BaseException, path: str, settings: StorageSettings) -> str:
    """What went wrong, in the words a user acts on, from pyarrow's (AWS SDK's, GCS client's) error."""
    text = str(err)
    name = scheme(path)
    where = settings.endpoint(name)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    denied = ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH", "PERMISSION_DENIED")
    if any(word in text.upper() for word in (*denied, "UNAUTHENTICATED", "FORBIDDEN", "HTTP 403")):
        credentials = (
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            if name == "s3"
            else "GOOGLE_APPLICATION_CREDENTIALS (or the VM's service account)"
        )
        return f"access denied by {where}: check the credentials ({credentials}) ({first})"
    if "NO_SUCH_BUCKET" in text.upper():
        return f"bucket {bucket(path)!r} does not exist at {where}"
    unreachable = ("NETWORK_CONNECTION", "CURLCODE", "COULD NOT CONNECT", "COULD NOT RESOLVE", "UNAVAILABLE")
    if any(word in text.upper() for word in unreachable):
        return f"cannot reach {where} ({first})"
    return f"{where}: {first}"


def _within(seconds: float, call: Any) -> Any:
    """`call()`, or TimeoutError after `seconds` (the call is left running in a daemon thread:
    pyarrow offers no way to cancel it)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="svdray-storage-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def check(path: str | Path, key: str, need: str = "file", settings: StorageSettings | None = None) -> None:
    """Fail fast, naming `key` and the URI, unless the object store answers and `path` is usable:
    need="file" (an object to read), "folder" (a prefix holding objects, e.g. a checkpoint) or
    "bucket" (somewhere to write: its bucket exists and these credentials reach it). Local paths
    pass (their own checks name the missing file). Answers within SVDRAY_STORAGE_TIMEOUT_S."""
    try:
        if not is_remote(path):
            return
    except StorageError as err:
        raise StorageError(f"{key}: {err}") from None
    settings = settings or StorageSettings.from_env()
    uri = normalize(path)
    fs = _filesystem(scheme(uri), settings, True)
    inner = uri.split("://", 1)[1]

    def look() -> tuple[pafs.FileType, pafs.FileType | None]:
        root = fs.get_file_info(bucket(uri)).type
        if root == pafs.FileType.NotFound or need == "bucket" or "/" not in inner:
            return root, None
        return root, fs.get_file_info(inner).type

    try:
        root, kind = _within(settings.timeout_s, look)
    except TimeoutError:
        hint = (
            " (no reachable Google credentials?)" if scheme(uri) == "gs" and not settings.gcs_emulator else ""
        )
        raise StorageError(
            f"{key}: {uri}: no answer from {settings.endpoint(scheme(uri))} within "
            f"{settings.timeout_s:g} s{hint} (SVDRAY_STORAGE_TIMEOUT_S)"
        ) from None
    except OSError as err:
        raise StorageError(f"{key}: {uri}: {_classify(err, uri, settings)}") from None
    if root == pafs.FileType.NotFound:
        where = settings.endpoint(scheme(uri))
        raise StorageError(f"{key}: {uri}: bucket {bucket(uri)!r} does not exist at {where}")
    if kind is None:  # the bucket itself
        if need == "file":
            raise StorageError(f"{key}: {uri}: a bucket, not a file")
        return
    if need == "file" and kind != pafs.FileType.File:
        problem = "a folder, not a file" if kind == pafs.FileType.Directory else "not found"
        raise StorageError(f"{key}: {uri}: {problem}")
    if need == "folder" and kind != pafs.FileType.Directory:
        problem = "a file, not a folder" if kind == pafs.FileType.File else "not found"
        raise StorageError(f"{key}: {uri}: {problem}")
