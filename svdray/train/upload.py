"""Handing a checkpoint to Ray Train: copied to `train.storage_path` before training goes on
("sync"), or in a background thread while it does ("async", Ray Train's CheckpointUploadMode).

Either way the checkpoint's files are written on the spot (rank 0 writes them into a local
folder), so what a resumed run restores is the same; only the copy to storage moves off the
training thread. Ray Train registers an async checkpoint once its copy is done and waits for
outstanding copies when the training function returns, so the run's last checkpoint is in
storage by the time `trainer.fit()` returns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
from ray.train.v2.api.report_config import CheckpointUploadMode

UPLOAD_MODES = {"sync": CheckpointUploadMode.SYNC, "async": CheckpointUploadMode.ASYNC}


def report_checkpoint(
    metrics: dict[str, Any],
    name: str,
    write: Callable[[Path], Any] | None,
    upload: str,
    validate: bool = False,
) -> None:
    """`ray.train.report` with a checkpoint folder `name`; every rank calls it (a barrier), and
    the ranks that pass `write` (rank 0) write the checkpoint's files into the folder it gets.
    `validate` hands the checkpoint to the trainer's checkpoint validation (`validate.mode:
    checkpoint`) once it is in storage."""
    validation = validate and write is not None  # Ray validates the checkpoint rank 0 reports
    if upload == "sync":
        with tempfile.TemporaryDirectory(prefix="svdray-checkpoint-") as tmp:
            checkpoint = _written(write, Path(tmp))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, validation=validation)
        return
    # The copy outlives this call, so the folder must too: not a TemporaryDirectory, which would
    # be gone before the background copy reads it. Ray deletes it once the copy is done
    # (`delete_local_checkpoint_after_upload`, spelled out although it is ASYNC's default).
    folder = Path(tempfile.mkdtemp(prefix="svdray-checkpoint-")) if write else None
    ray.train.report(
        metrics,
        checkpoint=_written(write, folder),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=UPLOAD_MODES[upload],
        delete_local_checkpoint_after_upload=True,
        validation=validation,
    )


def _written(write: Callable[[Path], Any] | None, folder: Path | None) -> ray.train.Checkpoint | None:
    if write is None or folder is None:
        return None
    write(folder)
    return ray.train.Checkpoint.from_directory(str(folder))
