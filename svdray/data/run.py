"""What one training run feeds, and the account of it in MLflow.

Before training: the rows (a prepared folder, or the manifest prepared now), bad rows counted
and listed (or, with data.strict, the run stopped), the latent cache filled when data.cache is
on, and the Ray Dataset built. After training: how many clips and examples the workers were fed
and which clips failed to decode on the way, from the run's data ledger.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.data

from svdray import tracking
from svdray.config import Config
from svdray.data.cache import CacheResult, build_cached_dataset, ensure_cache
from svdray.data.dataset import build_training_dataset
from svdray.data.ledger import create_ledger
from svdray.data.manifest import DataError, ManifestError, write_manifest
from svdray.data.prepare import Prepared, summary_table, training_rows

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    rows: list[dict[str, Any]]
    dataset: ray.data.Dataset
    prepared: Prepared
    ledger: Any
    cache: CacheResult | None
    work_dir: Path


def build_run_data(cfg: Config, num_samples: int, skip: int, uri: str, run_id: str) -> RunData:
    """Rows, cache and dataset for `run_training`; data counts and rejects go to the MLflow run.

    Stops with DataError (and marks the MLflow run failed) when data.strict finds bad rows or
    when no clip is usable."""
    work_dir = Path(cfg.output_dir) / "data"
    try:
        prepared = training_rows(cfg.data, work_dir)
    except (DataError, ManifestError):
        tracking.end_run(uri, run_id, status="FAILED")
        raise
    ledger = create_ledger(cfg.train.name)
    group = cfg.train.batch_size * cfg.train.num_workers  # examples per micro-step, all workers
    cache = None
    if cfg.data.cache:
        cache = ensure_cache(prepared.rows, cfg.data, cfg.model)
        for failure in cache.failures:
            ledger.record_failure.remote(failure.clip_id, -1, failure.reason, failure.message)
        if cache.failures and cfg.data.strict:
            tracking.end_run(uri, run_id, status="FAILED")
            raise DataError(
                "data.strict: clips failed to decode while caching:\n"
                + "\n".join(f"  {f.clip_id} [{f.reason}] {f.message}" for f in cache.failures)
            )
        if not cache.entries:
            tracking.end_run(uri, run_id, status="FAILED")
            raise DataError(f"no clip could be cached ({len(cache.failures)} failed)")
        dataset = build_cached_dataset(
            prepared.rows, cfg.data, cache, num_samples, cfg.train.seed, skip, group, ledger
        )
    else:
        dataset = build_training_dataset(
            prepared.rows, cfg.data, num_samples, cfg.train.seed, skip, group, ledger
        )
    log_prepared(uri, run_id, prepared, work_dir, cache)
    return RunData(prepared.rows, dataset, prepared, ledger, cache, work_dir)


def log_prepared(
    uri: str, run_id: str, prepared: Prepared, work_dir: Path, cache: CacheResult | None
) -> None:
    """Counts as MLflow tags (one value each, not charts; params could not change when a resumed
    run sees other data), the rejects and the summary table as artifacts under data/."""
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
    tracking.set_tags(uri, run_id, counts)
    work_dir.mkdir(parents=True, exist_ok=True)
    rejects = write_manifest([r.to_dict() for r in prepared.rejects], work_dir / "run_rejects.jsonl")
    summary = work_dir / "summary.txt"
    summary.write_text(summary_table(prepared) + "\n")
    tracking.log_artifacts(uri, run_id, {"data": rejects})
    tracking.log_artifacts(uri, run_id, {"data": summary})


def finish_run_data(data: RunData, uri: str, run_id: str) -> dict[str, Any]:
    """Read the ledger: examples fed per worker, clips fed, decode failures; log them to MLflow
    with data/report.json (the failures and how often each clip was fed), then drop the ledger."""
    summary = ray.get(data.ledger.summary.remote())
    failures = ray.get(data.ledger.failure_rows.remote())
    fed = ray.get(data.ledger.fed_rows.remote())
    report = {
        **summary,
        "failures": failures,
        "times_fed": dict(Counter(clip for _, clip, _ in fed)),
        "never_fed": sorted({r["clip_id"] for r in data.rows} - {clip for _, clip, _ in fed}),
    }
    path = data.work_dir / "report.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    tracking.set_tags(
        uri,
        run_id,
        {
            "data.samples_fed": summary["samples_fed"],
            "data.clips_fed": summary["clips_fed"],
            "data.decode_failures": summary["decode_failures"],
        },
    )
    tracking.log_artifacts(uri, run_id, {"data": path})
    if failures:
        logger.warning(
            "%d clip(s) failed to decode during training and were skipped: %s",
            len(failures),
            "; ".join(f["message"] for f in failures[:5]) + (" ..." if len(failures) > 5 else ""),
        )
    ray.kill(data.ledger)
    return report
