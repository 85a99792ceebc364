"""What one training run feeds, and the account of it for MLflow.

Before training: the rows (a prepared folder, or the manifest prepared now), bad rows counted
and listed (or, with data.strict, the run stopped), the latent cache filled when data.cache is
on, and the Ray Dataset built. After training: how many clips and examples the workers were fed
and which clips failed to decode on the way, from the run's data ledger. The trainer logs both
accounts (`DataRecord`): the data layer knows nothing of MLflow.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data

from svdray.config import Config, DataConfig, ModelConfig
from svdray.data.cache import CacheEncoderSpec, CacheResult, build_cached_dataset, ensure_cache
from svdray.data.dataset import build_training_dataset
from svdray.data.ledger import Fed, create_ledger
from svdray.data.manifest import DataError, write_manifest
from svdray.data.prepare import Prepared, summary_table, training_rows

logger = logging.getLogger(__name__)


@dataclass
class DataRecord:
    """What a run logs about its data: MLflow tags, and files for its `data/` artifacts."""

    tags: dict[str, Any]
    files: list[Path]


@dataclass
class RunData:
    rows: list[dict[str, Any]]
    dataset: ray.data.Dataset
    prepared: Prepared
    ledger: Any
    cache: CacheResult | None
    work_dir: Path
    record: DataRecord  # the prepared rows' account, to log before training


def build_run_data(cfg: Config, num_samples: int, skip: int, encoder: CacheEncoderSpec) -> RunData:
    """Rows, cache (filled by the model family's `encoder`) and dataset for `run_training`.

    Raises DataError (or ManifestError) when data.strict finds bad rows or when no clip is
    usable; the caller marks its run failed."""
    work_dir = Path(cfg.output_dir) / "data"
    prepared = training_rows(cfg.data, work_dir)
    ledger = create_ledger(cfg.train.name)
    cache = fill_cache(prepared.rows, cfg.data, cfg.model, encoder, ledger) if cfg.data.cache else None
    dataset = training_stream(
        prepared.rows, cfg.data, num_samples, cfg.train.seed, skip, cfg.train.bucket_run(), ledger, cache
    )
    record = prepared_record(prepared, work_dir, cache)
    return RunData(prepared.rows, dataset, prepared, ledger, cache, work_dir, record)


def fill_cache(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    model: ModelConfig,
    encoder: CacheEncoderSpec,
    ledger: Any = None,
) -> CacheResult:
    """`ensure_cache`, with the clips that failed to decode recorded in `ledger` (when given);
    raises DataError when data.strict and a clip failed, or when no clip could be cached."""
    cache = ensure_cache(rows, cfg, model, encoder)
    if ledger is not None:
        for failure in cache.failures:
            ledger.record_failure.remote(failure.clip_id, -1, failure.reason, failure.message)
    if cache.failures and cfg.strict:
        raise DataError(
            "data.strict: clips failed to decode while caching:\n"
            + "\n".join(f"  {f.clip_id} [{f.reason}] {f.message}" for f in cache.failures)
        )
    if not cache.entries:
        raise DataError(f"no clip could be cached ({len(cache.failures)} failed)")
    return cache


def training_stream(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    num_samples: int,
    seed: int,
    skip: int = 0,
    group: int = 1,
    ledger: Any = None,
    cache: CacheResult | None = None,
) -> ray.data.Dataset:
    """The training stream: `num_samples` planned examples (after the first `skip`), in runs of
    `group` of one aspect-ratio bucket, read from `cache` when given, else decoded; examples that
    fail on the way are recorded in `ledger` (when given)."""
    if cache is not None:
        return build_cached_dataset(rows, cfg, cache, num_samples, seed, skip, group, ledger)
    return build_training_dataset(rows, cfg, num_samples, seed, skip, group, ledger)


def prepared_record(prepared: Prepared, work_dir: Path, cache: CacheResult | None) -> DataRecord:
    """Counts as tags (one value each, not charts; params could not change when a resumed run
    sees other data), the rejects and the summary table as files (written under `work_dir`)."""
    counts: dict[str, int] = {
        "data.rows": len(prepared.rows) + len(prepared.rejects),
        "data.accepted": len(prepared.rows),
        "data.rejected": len(prepared.rejects),
    }
    for reason, count in prepared.reject_counts().items():
        counts[f"data.rejected.{reason}"] = count
    if cache is not None:
        counts["data.cache_hits"] = cache.hits
        counts["data.cache_computed"] = cache.computed
    work_dir.mkdir(parents=True, exist_ok=True)
    rejects = write_manifest([r.to_dict() for r in prepared.rejects], work_dir / "run_rejects.jsonl")
    summary = work_dir / "summary.txt"
    summary.write_text(summary_table(prepared) + "\n")
    return DataRecord(counts, [rejects, summary])


def finish_run_data(data: RunData) -> DataRecord:
    """Read the ledger: examples fed per worker, clips fed, decode failures, as tags and
    data/report.json (the failures, how often each clip was fed, steps redone after a restart,
    examples the kept steps trained on twice in one epoch), every example fed as data/fed.csv
    (rank, clip_id, epoch, step, attempt); then drop the ledger."""
    summary = ray.get(data.ledger.summary.remote())
    failures = ray.get(data.ledger.failure_rows.remote())
    fed = ray.get(data.ledger.fed_rows.remote())
    report = {
        **summary,
        "failures": failures,
        "times_fed": dict(Counter(row.clip_id for row in fed)),
        "never_fed": sorted({r["clip_id"] for r in data.rows} - {row.clip_id for row in fed}),
    }
    path = data.work_dir / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    table = data.work_dir / "fed.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Fed._fields)
        writer.writerows(fed)
    tags = {f"data.{key}": summary[key] for key in ("samples_fed", "clips_fed", "decode_failures")}
    if failures:
        logger.warning(
            "%d clip(s) failed to decode during training and were skipped: %s",
            len(failures),
            "; ".join(f["message"] for f in failures[:5]) + (" ..." if len(failures) > 5 else ""),
        )
    ray.kill(data.ledger)
    return DataRecord(tags, [path, table])
