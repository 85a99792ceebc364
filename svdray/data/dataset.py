"""The Ray Data pipeline that feeds training: planned examples -> decoded, cropped uint8 clips.

The driver plans every epoch up front (a seeded permutation per epoch), so the order of examples
and each example's random start and crop are fixed by the run seed alone. A resumed run skips
exactly the examples it has already trained on, and no worker's timing changes what it sees.

Decoding runs in a pool of long-lived decoder actors, each handed runs of several examples with
the next run already queued: Ray Data leaves a decode slot idle for about 0.2 s at every task
boundary (its scheduler notices a finished task within 0.1 s, then starts the next) and spends
tens of milliseconds of CPU on each task's bookkeeping, so one example per task, or a task pool
that waits for a task to end before starting the next, loses a sixth of a small machine's CPU
(benchmarks/RESULTS.md). Every example still leaves its decoder as a block of its own. Ray Train
hands blocks to its workers in order, each to the worker that has received the fewest rows (with
`preserve_order`), so one-example blocks deal the stream out round-robin: n workers taking k
examples each consume exactly the first n * k examples of the plan, which is what makes "one
epoch feeds every clip once" hold.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from svdray.config import DataConfig
from svdray.data.buckets import assign_buckets
from svdray.data.video import ClipError, FrameSpec, decode_clip, motion_score

logger = logging.getLogger(__name__)

ROWS_PER_TASK = 4  # examples per input block of the cache and probing tasks
# A decoder's run of examples is bounded by what it emits (at most DECODE_RUN_BYTES of decoded
# frames: with `preserve_order` a run's examples may wait in the object store until the runs
# before it are consumed), by MAX_DECODE_RUN, and by what is left of the stream: runs shrink
# towards its end so that every decoder gets MIN_RUNS_PER_DECODER of what remains, and the
# stream does not end with one decoder working through a long run while the others idle.
DECODE_RUN_BYTES = 256 * 2**20
MAX_DECODE_RUN = 16
MIN_RUNS_PER_DECODER = 4
# Ray Data retries a task whose worker died forever by default; a decoder that crashes on a
# corrupt file would then hang the run. One retry covers a transient loss (a killed process).
# (Passed as a Ray remote argument: deprecated for Ray 2.64, the only way in the pinned 2.60.)
CRASH_RETRIES = 1


def frame_spec(cfg: DataConfig, height: int | None = None, width: int | None = None) -> FrameSpec:
    return FrameSpec(cfg.num_frames, cfg.fps, height or cfg.height, width or cfg.width, cfg.start, cfg.crop)


def example_seed(run_seed: int, epoch: int, clip_id: str) -> int:
    return zlib.crc32(f"{run_seed}:{epoch}:{clip_id}".encode())


def plan_item(row: dict[str, Any], size: tuple[int, int], epoch: int, seed: int) -> dict[str, Any]:
    """One planned example: everything a decoder needs, with fixed types (an Arrow schema)."""
    return {
        "video": row["video"],
        "image": row.get("image") or "",
        "clip_id": row["clip_id"],
        "epoch": epoch,
        "seed": seed,
        "fps": float(row.get("fps") or 0.0),  # 0: data.fps
        # The manifest's value, passed through for the model family (-1: none).
        "motion_bucket_id": float(row["motion_bucket_id"])
        if row.get("motion_bucket_id") is not None
        else -1.0,
        "prompt": str(row.get("prompt") or ""),
        "start_frame": int(row.get("start_frame", -1)),
        "height": size[0],
        "width": size[1],
        "source_height": int(row.get("height") or 0),  # probed by `svdray prepare`; 0: unknown
        "source_width": int(row.get("width") or 0),
    }


def plan_epochs(
    rows: list[dict[str, Any]],
    num_samples: int,
    seed: int,
    shuffle: bool,
    skip: int = 0,
    sizes: list[tuple[int, int]] | None = None,
    group: int = 1,
) -> list[dict[str, Any]]:
    """The training stream: whole epochs, each a seeded permutation of `rows`, enough for
    `num_samples` plus one spare epoch for clips that fail to decode; the first `skip` examples
    (already trained on) are left out.

    With several training sizes (aspect-ratio buckets) the stream is made of runs of `group`
    examples (all workers' micro-batches of one step) from one bucket, so every batch is one
    bucket. A bucket's clips that do not fill a run wait for the next epoch: none is dropped.
    """
    sizes = sizes or [(0, 0)] * len(rows)
    items: list[dict[str, Any]] = []
    waiting: dict[tuple[int, int], list[dict[str, Any]]] = {}
    epoch = 0
    while len(items) < num_samples + len(rows):
        order = np.random.default_rng([seed, epoch]).permutation(len(rows)) if shuffle else range(len(rows))
        planned = [
            plan_item(rows[i], sizes[i], epoch, example_seed(seed, epoch, rows[i]["clip_id"])) for i in order
        ]
        if len(set(sizes)) <= 1:
            items.extend(planned)
        else:
            runs = []
            for item in planned:
                queue = waiting.setdefault((item["height"], item["width"]), [])
                queue.append(item)
                if len(queue) == group:
                    runs.append(list(queue))
                    queue.clear()
            if shuffle:
                runs = [runs[i] for i in np.random.default_rng([seed, epoch, 1]).permutation(len(runs))]
            items.extend(item for run in runs for item in run)
        epoch += 1
    return items[skip:]


def item_fps(item: dict[str, Any], cfg: DataConfig) -> float:
    return float(item["fps"]) if item["fps"] > 0 else cfg.fps


def decode_item(item: dict[str, Any], cfg: DataConfig, seed: int):
    """(frames, image) of a planned example, as `decode_clip` samples them."""
    spec = FrameSpec(
        cfg.num_frames, item_fps(item, cfg), int(item["height"]), int(item["width"]), cfg.start, cfg.crop
    )
    source = (int(item["source_height"]), int(item["source_width"])) if item["source_height"] else None
    return decode_clip(
        str(item["video"]),
        spec,
        seed,
        str(item["image"]) or None,
        int(item["start_frame"]) if item["start_frame"] >= 0 else None,
        source,
    )


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(size)]


def decode_batch(batch: dict[str, np.ndarray], cfg: DataConfig, ledger=None) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function (one example per call): decode it, or skip it when its file
    no longer decodes (changed since `svdray prepare`), recording the failure in the run's
    ledger; with data.strict the run stops instead, naming the file and reason."""
    (item,) = _rows(batch)
    try:
        frames, image = decode_item(item, cfg, int(item["seed"]))
    except Exception as err:  # never let one bad file end a run that is hours in
        error = err if isinstance(err, ClipError) else ClipError(f"{item['video']}: {err}")
        if cfg.strict:
            raise error from err
        logger.warning("skipping clip %s: %s", item["clip_id"], error)
        if ledger is not None:
            ray.get(
                ledger.record_failure.remote(
                    str(item["clip_id"]), int(item["epoch"]), error.reason, str(error)
                )
            )
        return {
            "video": np.zeros((0, cfg.num_frames, 3, int(item["height"]), int(item["width"])), np.uint8),
            "image": np.zeros((0, 3, int(item["height"]), int(item["width"])), np.uint8),
            "fps": np.zeros(0, np.float32),
            "motion": np.zeros(0, np.float64),
            "motion_bucket_id": np.zeros(0, np.float32),
            "prompt": np.array([], dtype=object),
            "clip_id": np.array([], dtype=object),
            "epoch": np.zeros(0, np.int64),
        }
    return {
        "video": frames.numpy()[None],
        "image": image.numpy()[None],
        "fps": np.array([item_fps(item, cfg)], np.float32),
        "motion": np.array([motion_score(frames)], np.float64),
        "motion_bucket_id": np.array([item["motion_bucket_id"]], np.float32),
        "prompt": np.array([str(item["prompt"])], dtype=object),
        "clip_id": np.array([str(item["clip_id"])], dtype=object),
        "epoch": np.array([int(item["epoch"])], np.int64),
    }


def map_with_bounded_retries(ds: ray.data.Dataset, fn, **kwargs) -> ray.data.Dataset:
    """`ds.map_batches(fn, ...)` whose tasks (or, for a class run by an actor pool, whose actor
    tasks after a restart) are retried CRASH_RETRIES times, not forever."""
    retries = {"max_task_retries" if isinstance(fn, type) else "max_retries": CRASH_RETRIES}
    with warnings.catch_warnings():  # the remote-argument deprecation, for Ray 2.64
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(fn, **retries, **kwargs)


def planned_dataset(items: list[dict[str, Any]]) -> ray.data.Dataset:
    """The plan as a Dataset of blocks of ROWS_PER_TASK examples, in order."""
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / ROWS_PER_TASK)))


def decode_slots(cfg: DataConfig) -> int:
    """The decoder pool's maximum: data.decoders, else as many as the cluster's CPUs hold at
    data.decode_cpus each (Ray Data grows the pool from one as CPUs are free next to training)."""
    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else float(os.cpu_count() or 1)
    fit = max(1, int(cpus // cfg.decode_cpus))
    return min(fit, cfg.decoders) if cfg.decoders else fit


def decode_runs(items: list[dict[str, Any]], cfg: DataConfig, decoders: int) -> list[list[dict[str, Any]]]:
    """The plan cut into decoder runs (one actor task each): see DECODE_RUN_BYTES."""
    pixels = max([int(item["height"]) * int(item["width"]) for item in items] + [cfg.height * cfg.width])
    example_bytes = (cfg.num_frames + 1) * 3 * pixels  # the frames and the conditioning image
    longest = max(1, min(MAX_DECODE_RUN, DECODE_RUN_BYTES // example_bytes))
    runs, start = [], 0
    while start < len(items):
        size = max(1, min(longest, (len(items) - start) // (MIN_RUNS_PER_DECODER * decoders)))
        runs.append(items[start : start + size])
        start += size
    return runs


class ClipDecoder:
    """A Ray Data decoder actor: `decode_batch` in a process that lives as long as the stream."""

    def __init__(self, cfg: DataConfig, ledger=None):
        self.cfg, self.ledger = cfg, ledger

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_batch(batch, self.cfg, self.ledger)


def same_shape_batches(
    blocks: Iterable[dict[str, np.ndarray]], batch_size: int, columns: tuple[str, ...]
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` examples whose `columns` have one shape (one aspect-ratio bucket).

    The plan keeps each step's examples in one bucket; grouping by shape keeps every batch
    stackable even when a clip that failed to decode shifts the stream. Extra columns (clip_id,
    epoch) come along as arrays.
    """
    waiting: dict[tuple, list[dict[str, Any]]] = {}
    for block in blocks:
        if not len(block.get("clip_id", ())):
            continue  # an example that failed to decode
        present = [k for k in columns if k in block]
        for example in _rows(block):
            shape = tuple(np.shape(example[k]) for k in present)
            group = waiting.setdefault(shape, [])
            group.append(example)
            if len(group) == batch_size:
                del waiting[shape]
                yield {k: np.stack([np.asarray(e[k]) for e in group]) for k in group[0]}


def one_example_blocks(ds: ray.data.Dataset, strict: bool) -> ray.data.Dataset:
    """Make every example its own block, in plan order, so Ray Train deals examples to workers
    round-robin.

    A map task packs its outputs into blocks of up to `target_max_block_size` bytes; with a
    limit of one byte each example is emitted as a block of its own, inside the decoder
    (a `repartition` would be a separate operator whenever its resources differ from the
    decode's, costing a task per block). Unless strict, a run whose decoder dies twice (a
    decoder crashing on a corrupt file) loses its few examples instead of ending the run: Ray
    Data logs the error and goes on.
    """
    ds.context.target_max_block_size = 1
    ds.context.execution_options.preserve_order = True  # plan order: what exact resume relies on
    if not strict:
        ds.context.max_errored_blocks = -1
    return ds


def build_training_dataset(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    num_samples: int,
    seed: int,
    skip: int = 0,
    group: int = 1,
    ledger=None,
) -> ray.data.Dataset:
    """Decoding runs as parallel Ray tasks, streamed: no clip is decoded long before it is used.

    `group` is the number of examples one optimizer step takes from all workers' micro-batches
    (batch_size x num_workers); with aspect-ratio buckets the plan keeps each such run in one
    bucket.
    """
    sizes = assign_buckets(rows, cfg.buckets, (cfg.height, cfg.width))
    return decoded_stream(plan_epochs(rows, num_samples, seed, cfg.shuffle, skip, sizes, group), cfg, ledger)


def decoded_stream(items: list[dict[str, Any]], cfg: DataConfig, ledger=None) -> ray.data.Dataset:
    """Planned examples -> decoded examples, one per block, in plan order."""
    decoders = decode_slots(cfg)
    # One block per decoder run, exactly (from_blocks keeps them as given). Its block metadata is
    # read here; from_arrow would read it in a Ray task per table, and the burst of tasks spawned
    # a worker process for each on a small machine (about 10 s of CPU in every run).
    runs = ray.data.from_blocks([pa.Table.from_pylist(run) for run in decode_runs(items, cfg, decoders)])
    # A decoder whose process dies (a crash on a corrupt file) is restarted by Ray Data, and the
    # run it held retried CRASH_RETRIES times.
    decoded = map_with_bounded_retries(
        runs,
        ClipDecoder,
        fn_constructor_kwargs=dict(cfg=cfg, ledger=ledger),
        batch_size=1,
        # Two runs in flight per decoder: the next is queued while one decodes, no idle gap.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders, max_tasks_in_flight_per_actor=2),
        num_cpus=cfg.decode_cpus,
    )
    return one_example_blocks(decoded, cfg.strict)
