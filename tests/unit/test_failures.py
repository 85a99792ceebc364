"""An error that would recur on a restart stops the run at once with its message and step; the
failures a restart cures (lost workers, a collective whose peer died) are still restarted within
`train.max_failures` (tests/integration/test_resume.py kills a worker for real and checks the restart)."""

from __future__ import annotations

import multiprocessing
import pickle

import ray.exceptions
import torch.distributed as dist

from svdray.data.manifest import RowError
from svdray.data.video import ClipError
from tests.support.collectives import collective_after_peer_died
from tests.support.servers import free_port


def test_which_errors_a_restart_can_cure() -> None:
    from svdray.train.failures import TrainingFailed, restart_can_cure, svdray_error

    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    port = free_port()
    ranks = [context.Process(target=collective_after_peer_died, args=(r, port, errors)) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    kind, message = errors.get(timeout=10)
    assert kind == "RuntimeError", message
    # The real error gloo raises on the surviving rank, and Ray's and torch's own failure types.
    assert restart_can_cure(RuntimeError(message)), message
    assert restart_can_cure(ray.exceptions.ActorDiedError())
    assert restart_can_cure(dist.DistNetworkError("store connection lost"))
    # Errors of the code, the model or the config recur.
    for err in (
        TypeError("Got unsupported ScalarType BFloat16"),
        ValueError("bad shape"),
        ClipError("clip.mp4: cannot decode"),
        FileExistsError("out/validation"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    ):
        assert not restart_can_cure(err), err

    # svdray's own exception rides along (for callers that handle it by type) when it rebuilds
    # from its reduced form; a RowError (two arguments, one message) does not.
    clip_error = ClipError("clip.mp4: cannot decode")
    assert svdray_error(clip_error) is clip_error
    assert svdray_error(RowError("missing", "row 3: no video")) is None
    assert svdray_error(ValueError("bad shape")) is None

    # Ray ships TrainingFailed from the worker to the controller and the driver.
    failure = TrainingFailed("TypeError", "Got unsupported ScalarType BFloat16", 1, 250, "Traceback ...")
    copy = pickle.loads(pickle.dumps(failure))
    assert str(copy) == str(failure) and copy.step == 250 and copy.worker_traceback == "Traceback ..."
    assert "on worker 1 after step 250: TypeError: Got unsupported ScalarType BFloat16" in str(copy)
