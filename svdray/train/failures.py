"""Which worker failures a restart can cure, and stopping a run at once on those it cannot.

`train.max_failures` restarts the worker group from the latest checkpoint, which cures a lost
worker process or node (and the collectives its peers were in), but not an exception raised by
svdray's code, the libraries it calls or the config (a dtype the model cannot take, a bad path,
a bug in validation): that one recurs on every restart, each after reloading the model, and the
run would end only when the failure budget is spent. Ray Train V2's failure policy retries every
worker error alike (its FailureConfig offers no way to tell them apart), so:

- on each worker, `stop_on_errors(loop)` turns an exception a restart cannot cure into a
  `TrainingFailed` carrying the original type, message, rank, step and traceback;
- on Ray Train's controller, `StopOnTrainingFailed` (a UserCallback) sees the worker errors before
  the failure policy does and, when every one is a `TrainingFailed`, raises it: an error in the
  controller is one the policy never retries, so the run ends with it and no restart;
- on the driver, `training_failure(err)` finds it in what `trainer.fit()` raised.

The module imports only Ray at its top: the controller unpickles the callback, and importing
torch and peft there would cost every run seconds of CPU.
"""

from __future__ import annotations

import copy
import functools
import traceback
from collections.abc import Callable
from typing import Any

import ray.exceptions
import ray.train

# Substrings of the RuntimeError a gloo collective raises when a peer process died or hung (gloo
# has no exception type of its own; NCCL's errors are torch.distributed.DistBackendError).
PEER_LOST_MARKERS = ("/gloo/", "Connection closed by peer", "Connection reset by peer")


class TrainingFailed(RuntimeError):
    """An exception on a training worker that a restart would raise again; the run stopped."""

    def __init__(
        self,
        error_type: str,
        message: str,
        rank: int,
        step: int | None,
        worker_traceback: str = "",
        original: BaseException | None = None,
    ):
        self.error_type, self.message, self.rank, self.step = error_type, message, rank, step
        self.worker_traceback = worker_traceback
        # svdray's own exception (e.g. RewardCheckError), for callers that handle it by type.
        self.original = original
        where = "before the first step" if not step else f"after step {step}"
        super().__init__(
            f"failed on worker {rank} {where}: {error_type}: {message}\n(an error in the code, the "
            "model or the config recurs on a restart, so the run stopped at once; train.max_failures "
            "restarts only after lost workers)"
        )

    def __reduce__(self):
        args = (self.error_type, self.message, self.rank, self.step, self.worker_traceback, self.original)
        return (self.__class__, args)


def restart_can_cure(err: BaseException) -> bool:
    """True for failures of the machinery around the training code: Ray (a dead actor, a lost
    object or node), the process group (a collective whose peer died) and the network."""
    import torch.distributed  # here, not at the top: Ray Train's controller imports this module

    if isinstance(err, ray.exceptions.RayTaskError):  # an exception raised inside a Ray task/actor
        return err.cause is not None and err.cause is not err and restart_can_cure(err.cause)
    if isinstance(err, (ray.exceptions.RayError, torch.distributed.DistError, ConnectionError, TimeoutError)):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in PEER_LOST_MARKERS)


def steps_done(tb: Any) -> int | None:
    """The training state's step where the exception passed through the loop, if it did (the
    loop's `state: TrainState` local), read from the traceback's frames."""
    from svdray.train.checkpoint import TrainState  # imports peft: on the workers only

    step = None
    while tb is not None:
        state = tb.tb_frame.f_locals.get("state")
        if isinstance(state, TrainState):
            step = state.step
        tb = tb.tb_next
    return step


def svdray_error(err: BaseException) -> BaseException | None:
    """`err` if it is one of svdray's own exceptions and rebuilds from its reduced form (how Ray
    ships it to the controller and the driver); else None."""
    if not type(err).__module__.startswith("svdray."):
        return None
    try:
        copy.copy(err)  # rebuilt through __reduce_ex__, as unpickling would
    except Exception:
        return None
    return err


def stop_on_errors(loop: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """`loop` (a Ray Train worker function), with exceptions a restart cannot cure raised as
    TrainingFailed; the others (and BaseExceptions) pass through for Ray Train to restart."""

    @functools.wraps(loop)
    def worker(loop_config: dict[str, Any]) -> Any:
        try:
            return loop(loop_config)
        except Exception as err:
            if restart_can_cure(err):
                raise
            raise TrainingFailed(
                type(err).__name__,
                str(err),
                ray.train.get_context().get_world_rank(),
                steps_done(err.__traceback__),
                "".join(traceback.format_exception(err)),
                svdray_error(err),
            ) from err

    return worker


class StopOnTrainingFailed(ray.train.UserCallback):
    """Ends the run when its workers failed with TrainingFailed only (a worker that died as well
    may have caused the others' errors: that one goes to the failure policy and its restarts)."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        failures = [err for err in worker_exceptions.values() if isinstance(err, TrainingFailed)]
        if failures and len(failures) == len(worker_exceptions):
            raise failures[0]


def training_failure(err: BaseException) -> TrainingFailed | None:
    """The TrainingFailed inside what `trainer.fit()` raised (a ControllerError when the callback
    stopped the run, a WorkerGroupError otherwise), if there is one."""
    if isinstance(err, TrainingFailed):
        return err
    if isinstance(err, ray.train.ControllerError) and isinstance(err.controller_failure, TrainingFailed):
        return err.controller_failure
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        if isinstance(failure, TrainingFailed):
            return failure
    return None
