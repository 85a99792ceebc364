"""The latent cache: what a model family's frozen encoders make of each clip, computed once.

`svdray cache --config PATH` (and training with `data.cache: true`, for any clip not cached
yet) decodes each clip with Ray tasks and encodes it with a Ray Data actor pool (one actor per
GPU) running the family's cache encoder (a `CacheEncoderSpec`: for SVD, the VAE posterior of
every frame and the CLIP embedding of the clean conditioning image). Per clip it stores every
tensor the encoder returns, plus

    image    the clean conditioning image at training size, (3, H, W) uint8
    motion   the clip's motion score (`svdray.data.video.motion_score`), () float64

in safetensors shards under `<cache_dir>/<model key>/`. Each entry is keyed by a hash of
everything that determines it: the files (path, size, mtime), the preprocessing (frames, fps,
size, start, crop, start_frame), the prompt, and the encoders (the files of the family's
components, dtype, revision, and the family's cache version). A config change or an edited file
misses the cache; a re-run or another Tune trial of the same data hits.

The family decides what is worth caching. SVD, for one, caches no conditioning latent: training
adds noise of a per-sample random strength to the conditioning image *in pixel space* and
encodes the noisy image with the VAE, which no cached latent reproduces; so the clean pixels
(`image`) are cached and the family encodes the one noisy frame per step.

With data.start: random or data.crop: random, an entry holds one frame window and crop per clip,
drawn once from a seed derived from its key (not the run seed, so trials share it): every epoch
then trains on that window. Training without the cache draws a new window each epoch.

`data.cache_dir` may be a bucket (s3://, gs://; svdray.storage): shards are written and read
there by the same code (each shard whole or not at all; an entry read back with ranged reads of
its own tensors only), so every node, every later run and every Tune trial reads the same cache.

Reading an entry needs no torch (safetensors' numpy loader): the training stream's read tasks
run in processes of their own, where importing torch would be most of their cost; torch is
imported where the encoder runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import safetensors.numpy

from svdray import storage
from svdray.config import DataConfig, ModelConfig
from svdray.data.buckets import assign_buckets
from svdray.data.dataset import (
    decode_item,
    item_fps,
    map_with_bounded_retries,
    one_example_blocks,
    plan_epochs,
    plan_item,
    planned_dataset,
)
from svdray.data.manifest import Reject
from svdray.data.video import IMAGE_NOT_FOUND, VIDEO_NOT_FOUND, ClipError, motion_score
from svdray.progress import collect_rows

logger = logging.getLogger(__name__)

CACHE_FORMAT = "svdray-latents-2"
STORED_BY_CACHE = ("image", "motion")  # what every entry holds besides the encoder's tensors
CACHE_UNREADABLE = "cache_unreadable"


@dataclass(frozen=True)
class CacheEncoderSpec:
    """A model family's part of the cache.

    `cls(model: ModelConfig)` is built once per Ray Data actor; its
    `encode(videos, images, prompts) -> dict[str, Tensor]` takes uint8 videos (B, T, 3, H, W),
    uint8 conditioning images (B, 3, H, W) and the B prompts, and returns tensors with the batch
    dimension first (on any device). `components` are the pipeline subfolders whose files
    identify the encoders; `version` changes whenever the family changes what `encode` stores;
    `uses_prompts` puts each clip's prompt in its key (a family that ignores prompts keeps its
    entries when a caption is edited).
    """

    cls: type
    components: tuple[str, ...]
    version: str
    uses_prompts: bool = False


def cache_root(cfg: DataConfig) -> str:
    """The cache's folder: data.cache_dir (a local folder or a bucket URI), else the user's cache."""
    if cfg.cache_dir:
        return (
            storage.normalize(cfg.cache_dir)
            if storage.is_remote(cfg.cache_dir)
            else str(Path(cfg.cache_dir).expanduser().resolve())
        )
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "svdray" / "latents")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _folder_fingerprint(folder: Path) -> list[Any]:
    """Names, sizes and mtimes of a component's files, with its config's content."""
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            content = path.read_text() if path.suffix == ".json" else None
            files.append([path.name, stat.st_size, stat.st_mtime_ns, content])
    return files


def model_key(model: ModelConfig, components: tuple[str, ...]) -> str:
    """Identity of the encoders: a local pipeline folder by the files of its `components`, a hub
    id by its name, revision and variant; plus the dtype they encode in."""
    local = Path(model.pretrained).expanduser()
    identity: dict[str, Any] = {
        "pretrained": str(local.resolve()) if local.is_dir() else model.pretrained,
        "revision": model.revision,
        "variant": model.variant,
        "dtype": model.frozen_dtype,
    }
    if local.is_dir():
        for component in components:
            identity[component] = _folder_fingerprint(local / component)
    return _digest(identity)


def file_identity(path: str, reason: str) -> list[Any]:
    """[path, size, mtime_ns] of a file or an object (ClipError `reason` if it is gone)."""
    try:
        if not storage.is_remote(path):
            stat = os.stat(path)
            return [path, stat.st_size, stat.st_mtime_ns]
        info = storage.info(path)
    except OSError as err:
        raise ClipError(f"{path}: not found ({err})", reason) from err
    if info.type != storage.pafs.FileType.File:
        raise ClipError(f"{path}: not found", reason)
    return [path, info.size, storage.mtime_ns(info)]


def entry_key(item: dict[str, Any], cfg: DataConfig, model: str, encoder: CacheEncoderSpec) -> str:
    """The hash of everything that determines a planned example's cached tensors (`model`: the
    `model_key`)."""
    return _digest(
        {
            "format": CACHE_FORMAT,
            "model": model,
            "encoder": encoder.version,
            "video": file_identity(item["video"], VIDEO_NOT_FOUND),
            "image": file_identity(item["image"], IMAGE_NOT_FOUND) if item["image"] else None,
            "num_frames": cfg.num_frames,
            "fps": item_fps(item, cfg),
            "size": [item["height"], item["width"]],
            "start": cfg.start,
            "crop": cfg.crop,
            "start_frame": item["start_frame"],
            "prompt": item["prompt"] if encoder.uses_prompts else None,
        }
    )


def window_seed(key: str) -> int:
    """The random start and crop of a cached example: fixed by its key, the same in every trial."""
    return int(key[:8], 16)


def shard_header(f: Any) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file open for random access (a pyarrow file: local or an
    object), and where its tensor data starts. The format: an 8-byte little-endian header length,
    the header (each tensor's dtype, shape and byte range in the data), then the data; a shard
    cut short (its data ends before the header's last range) is a ValueError."""
    (length,) = struct.unpack("<Q", f.read_at(8, 0))
    header = json.loads(f.read_at(length, 8))
    end = max((t["data_offsets"][1] for n, t in header.items() if n != "__metadata__"), default=0)
    if f.size() < 8 + length + end:
        raise ValueError(f"cut short: {f.size()} bytes, its header describes {8 + length + end}")
    return header, 8 + length


def read_index(folder: str) -> dict[str, str]:
    """entry key -> shard file, from the shards' headers (the tensors are not read)."""
    index: dict[str, str] = {}
    for shard in storage.list_files(folder, ".safetensors"):
        try:
            with storage.open_input(shard) as f:
                metadata = shard_header(f)[0].get("__metadata__") or {}
        except Exception as err:  # a shard cut short by a crash: ignore it, its entries recompute
            logger.warning("ignoring unreadable cache shard %s: %s", shard, err)
            continue
        if metadata.get("format") == CACHE_FORMAT:
            for key in json.loads(metadata.get("entries", "[]")):
                index[key] = shard
    return index


# --------------------------------------------------------------------------------------------
# Computing entries


def decode_for_cache(batch: dict[str, np.ndarray], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Ray Data function (one example per call): the example's frames, conditioning image and
    motion, or an empty row carrying the error (so that the driver can report it)."""
    item = {k: v[0] for k, v in batch.items()}
    key = str(item["key"])
    try:
        frames, image = decode_item(item, cfg, window_seed(key))
        error, reason = "", ""
        motion = motion_score(frames)
        video, image = frames.numpy(), image.numpy()
    except Exception as err:
        error = str(err)
        reason = err.reason if isinstance(err, ClipError) else "decode_failed"
        video, image, motion = np.zeros((0, 3, 1, 1), np.uint8), np.zeros((3, 1, 1), np.uint8), 0.0
    return {
        "key": np.array([key], dtype=object),
        "clip_id": np.array([str(item["clip_id"])], dtype=object),
        "prompt": np.array([str(item["prompt"])], dtype=object),
        "video": video[None],
        "image": image[None],
        "motion": np.array([motion], np.float64),
        "error": np.array([error], dtype=object),
        "reason": np.array([reason], dtype=object),
    }


class CacheWriter:
    """Ray Data actor: builds the family's encoder once, encodes batches, writes one shard per
    batch (written to a temporary name, then renamed: a crash leaves no half shard)."""

    def __init__(self, encoder: CacheEncoderSpec, model: ModelConfig, folder: str):
        self.encoder = encoder.cls(model)
        self.folder = folder

    def encode(self, videos: list[np.ndarray], images: list[np.ndarray], prompts: list[str]):
        import torch

        encoded = self.encoder.encode(
            torch.from_numpy(np.stack(videos)), torch.from_numpy(np.stack(images)), prompts
        )
        clash = set(encoded) & set(STORED_BY_CACHE)
        if clash:
            raise ValueError(
                f"{type(self.encoder).__name__}.encode returned {sorted(clash)}: names the cache keeps"
            )
        return encoded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import safetensors.torch
        import torch

        size = len(batch["key"])
        good = [i for i in range(size) if not batch["error"][i]]
        tensors: dict[str, torch.Tensor] = {}
        by_shape: dict[tuple, list[int]] = {}
        for i in good:  # clips of different buckets are encoded in separate batches
            by_shape.setdefault(np.shape(batch["video"][i]), []).append(i)
        for rows in by_shape.values():
            encoded = self.encode(
                [batch["video"][i] for i in rows],
                [batch["image"][i] for i in rows],
                [str(batch["prompt"][i]) for i in rows],
            )
            for j, i in enumerate(rows):
                key = str(batch["key"][i])
                for name, value in encoded.items():
                    tensors[f"{key}/{name}"] = value[j].cpu().contiguous()
                tensors[f"{key}/image"] = torch.from_numpy(np.ascontiguousarray(batch["image"][i]))
                tensors[f"{key}/motion"] = torch.tensor(float(batch["motion"][i]), dtype=torch.float64)
        shard = ""
        if good:
            keys = [str(batch["key"][i]) for i in good]
            metadata = {"format": CACHE_FORMAT, "entries": json.dumps(keys)}
            shard = storage.write_bytes(
                storage.join(self.folder, f"shard-{uuid.uuid4().hex}.safetensors"),
                safetensors.torch.save(tensors, metadata=metadata),
            )
        return {
            "key": batch["key"],
            "clip_id": batch["clip_id"],
            "shard": np.array([shard if not batch["error"][i] else "" for i in range(size)], dtype=object),
            "error": batch["error"],
            "reason": batch["reason"],
        }


def encoder_pool_size(cfg: DataConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU in the cluster, or one CPU actor."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return cfg.cache_actors or gpus, 1.0
    return cfg.cache_actors or 1, 0.0


@dataclass
class CacheLookup:
    """Every row's entry key, and which keys the cache already holds."""

    folder: str
    keys: dict[str, tuple[str, dict[str, Any]]]  # clip_id -> (entry key, planned example)
    index: dict[str, str]  # entry key -> shard
    failures: list[Reject] = field(default_factory=list)  # files that are gone

    def missing(self) -> list[dict[str, Any]]:
        return [{**item, "key": key} for key, item in self.keys.values() if key not in self.index]


@dataclass
class CacheResult:
    folder: str
    entries: dict[str, tuple[str, str]]  # clip_id -> (entry key, shard path)
    hits: int = 0
    computed: int = 0
    failures: list[Reject] = field(default_factory=list)


def lookup_cache(
    rows: list[dict[str, Any]], cfg: DataConfig, model: ModelConfig, encoder: CacheEncoderSpec
) -> CacheLookup:
    mkey = model_key(model, encoder.components)
    folder = storage.join(cache_root(cfg), mkey[:16])
    sizes = assign_buckets(rows, cfg.buckets, (cfg.height, cfg.width))
    keys: dict[str, tuple[str, dict[str, Any]]] = {}
    failures: list[Reject] = []
    for row, size in zip(rows, sizes, strict=True):
        item = plan_item(row, size, epoch=0, seed=0)
        try:
            keys[row["clip_id"]] = (entry_key(item, cfg, mkey, encoder), item)
        except ClipError as err:
            failures.append(Reject(row["clip_id"], err.reason, str(err), row))
    return CacheLookup(folder, keys, read_index(folder), failures)


def ensure_cache(
    rows: list[dict[str, Any]], cfg: DataConfig, model: ModelConfig, encoder: CacheEncoderSpec
) -> CacheResult:
    """Look every row up in the cache and compute the entries that are missing with `encoder`.

    A clip that cannot be decoded is reported in `failures` (and left out of `entries`)."""
    lookup = lookup_cache(rows, cfg, model, encoder)
    todo = lookup.missing()
    index, failures = dict(lookup.index), list(lookup.failures)
    hits = len(lookup.keys) - len(todo)
    logger.info("latent cache %s: %d hits, %d to compute", lookup.folder, hits, len(todo))
    if todo:
        actors, gpus = encoder_pool_size(cfg)
        decoded = map_with_bounded_retries(
            planned_dataset(todo),
            decode_for_cache,
            batch_size=1,
            num_cpus=cfg.decode_cpus,
            fn_kwargs=dict(cfg=cfg),
        )
        encoded = decoded.map_batches(
            CacheWriter,
            batch_size=cfg.cache_batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            fn_constructor_kwargs=dict(encoder=encoder, model=model, folder=lookup.folder),
        )
        results = collect_rows(encoded, "cache", len(todo), "clips")
        for result in results:
            if result["error"]:
                failures.append(Reject(str(result["clip_id"]), str(result["reason"]), str(result["error"])))
            else:
                index[str(result["key"])] = str(result["shard"])
    entries = {clip: (key, index[key]) for clip, (key, _) in lookup.keys.items() if key in index}
    return CacheResult(lookup.folder, entries, hits, len(entries) - hits, failures)


# --------------------------------------------------------------------------------------------
# Reading entries for training


def read_entry(shard: str, key: str) -> dict[str, np.ndarray]:
    """Every tensor of an entry, by the name it was stored under, as a numpy array.

    Only the entry's own bytes are read (one ranged read per run of adjacent tensors, which
    matters for a shard in a bucket); they are handed to safetensors as a file of their own (its
    header rewritten to their new offsets), which checks and converts them."""
    prefix = f"{key}/"
    with storage.open_input(shard) as f:
        header, start = shard_header(f)
        names = sorted(
            (n for n in header if n.startswith(prefix)), key=lambda n: header[n]["data_offsets"][0]
        )
        runs: list[list[int]] = []  # [begin, end) of the data, adjacent tensors merged
        for name in names:
            begin, end = header[name]["data_offsets"]
            if runs and runs[-1][1] == begin:
                runs[-1][1] = end
            else:
                runs.append([begin, end])
        data = b"".join(f.read_at(end - begin, start + begin) for begin, end in runs)
    own: dict[str, Any] = {}
    offset = 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        own[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    raw = json.dumps(own).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors' writers align the data to 8 bytes
    tensors = safetensors.numpy.load(struct.pack("<Q", len(raw)) + raw + data)
    entry = {name[len(prefix) :]: tensors[name] for name in names}
    missing = [name for name in STORED_BY_CACHE if name not in entry]
    if missing:
        raise KeyError(f"{shard}: entry {key} lacks {missing}")
    return entry


def read_cached_batch(batch: dict[str, np.ndarray], cfg: DataConfig, ledger=None) -> dict[str, np.ndarray]:
    """Ray Data function (one example per call): a planned example from its cache entry. An
    entry that can no longer be read is skipped and recorded, like a clip that fails to decode."""
    item = {k: v[0] for k, v in batch.items()}
    try:
        entry = read_entry(str(item["shard"]), str(item["key"]))
    except Exception as err:
        if cfg.strict:
            raise
        message = f"{item['clip_id']}: cache entry unreadable ({err})"
        logger.warning("skipping clip %s", message)
        if ledger is not None:
            ray.get(
                ledger.record_failure.remote(
                    str(item["clip_id"]), int(item["epoch"]), CACHE_UNREADABLE, message
                )
            )
        return {"clip_id": np.array([], dtype=object), "epoch": np.zeros(0, np.int64)}
    # The stored tensors with a batch dimension of one: the family gets back what it stored.
    return {
        **{name: value[None] for name, value in entry.items()},
        "fps": np.array([item_fps(item, cfg)], np.float32),
        "motion_bucket_id": np.array([item["motion_bucket_id"]], np.float32),
        "prompt": np.array([str(item["prompt"])], dtype=object),
        "clip_id": np.array([str(item["clip_id"])], dtype=object),
        "epoch": np.array([int(item["epoch"])], np.int64),
    }


def build_cached_dataset(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    cache: CacheResult,
    num_samples: int,
    seed: int,
    skip: int = 0,
    group: int = 1,
    ledger=None,
) -> ray.data.Dataset:
    """The training stream of `build_training_dataset`, read from the cache instead of decoded."""
    rows = [row for row in rows if row["clip_id"] in cache.entries]
    sizes = assign_buckets(rows, cfg.buckets, (cfg.height, cfg.width))
    items = plan_epochs(rows, num_samples, seed, cfg.shuffle, skip, sizes, group)
    for item in items:
        item["key"], item["shard"] = cache.entries[item["clip_id"]]
    # Reading takes the decode slots (data.decode_cpus): a smaller share would start more worker
    # processes than reading a few files per example needs, competing with training as they start.
    read = planned_dataset(items).map_batches(
        read_cached_batch, batch_size=1, num_cpus=cfg.decode_cpus, fn_kwargs=dict(cfg=cfg, ledger=ledger)
    )
    return one_example_blocks(read, cfg.strict)
