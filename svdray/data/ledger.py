"""The data ledger: what a training run fed to its workers and which clips failed to decode.

One small Ray actor per run, named after the run (the Ray Train experiment name), so that the
decode tasks and every worker's batch iterator can find it without being handed a reference.
The driver reads it after training and reports the counts to MLflow: a clip that breaks after
`svdray prepare` is skipped and counted, and "nothing accepted is lost" can be checked rather
than hoped for.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import ray

from svdray.actors import fresh_named_actor


class Fed(NamedTuple):
    """One example a worker trained on."""

    rank: int
    clip_id: str
    epoch: int
    step: int  # the optimizer step it went into
    # The step the worker group's attempt started from (0, or the checkpoint it restored): a
    # restart redoes the steps after its checkpoint, so a step can appear under several attempts.
    attempt: int


def trained_examples(fed: list[Fed]) -> dict[int, list[Fed]]:
    """Per step, the examples of the last attempt that ran it: the ones its update kept (an
    earlier attempt's run of that step died with its worker group, before any checkpoint)."""
    last = {}
    for row in fed:
        last[row.step] = max(last.get(row.step, row.attempt), row.attempt)
    steps: dict[int, list[Fed]] = {}
    for row in fed:
        if row.attempt == last[row.step]:
            steps.setdefault(row.step, []).append(row)
    return dict(sorted(steps.items()))


def fed_twice_in_epoch(fed: list[Fed]) -> list[tuple[str, int]]:
    """(clip_id, epoch) pairs that the run's kept steps trained on more than once."""
    counts = Counter((row.clip_id, row.epoch) for rows in trained_examples(fed).values() for row in rows)
    return sorted(key for key, count in counts.items() if count > 1)


def ledger_name(experiment: str) -> str:
    return f"svdray-data-ledger:{experiment}"


@ray.remote(num_cpus=0)
class DataLedger:
    def __init__(self) -> None:
        self.fed: list[Fed] = []
        self.failures: list[dict[str, Any]] = []

    def record_fed(self, rank: int, clip_ids: list[str], epochs: list[int], step: int, attempt: int) -> None:
        self.fed.extend(Fed(rank, c, e, step, attempt) for c, e in zip(clip_ids, epochs, strict=True))

    def record_failure(self, clip_id: str, epoch: int, reason: str, message: str) -> None:
        self.failures.append({"clip_id": clip_id, "epoch": epoch, "reason": reason, "message": message})

    def fed_rows(self) -> list[Fed]:
        return list(self.fed)

    def failure_rows(self) -> list[dict[str, Any]]:
        return list(self.failures)

    def summary(self) -> dict[str, Any]:
        return {
            "samples_fed": len(self.fed),
            "clips_fed": len({row.clip_id for row in self.fed}),
            "fed_per_rank": dict(Counter(row.rank for row in self.fed)),
            "steps_redone": len({(row.step, row.attempt) for row in self.fed})
            - len({row.step for row in self.fed}),
            "fed_twice_in_epoch": fed_twice_in_epoch(self.fed),
            "decode_failures": len(self.failures),
            "failures_by_reason": dict(Counter(f["reason"] for f in self.failures)),
        }


def create_ledger(experiment: str):
    """A fresh ledger for this run (one left over from an earlier run in this driver is replaced)."""
    return fresh_named_actor(DataLedger, ledger_name(experiment))


def find_ledger(experiment: str):
    """The run's ledger, or None when the dataset was built without one (then nothing is recorded)."""
    try:
        return ray.get_actor(ledger_name(experiment))
    except ValueError:
        return None
