"""What Ray unpickles outside the training workers imports only Ray.

Ray Train's controller and dataset manager unpickle the trainer's callbacks and `dataset_config`
(`make_trainer`: StopOnTrainingFailed, DataParallelSplit); a Tune trial's controller its
ObjectiveReport (`run_trial`); Ray Data's dataset manager and split coordinator the decoder
(ClipDecoder, which imports torch only when it decodes); prepare's probe tasks `probe_batch`,
and the training stream's cache reads `read_cached_batch`.
Each imports the module that defines it, in a fresh process, once per run: a module that imports
torch, peft, diffusers or MLflow costs every run seconds of CPU in each of those processes. The
modules are read from the classes and functions, so moving one of them back into a heavy module
(such as svdray.train.trainer) fails here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from svdray.data.cache import read_cached_batch
from svdray.data.dataset import ClipDecoder
from svdray.data.prepare import probe_batch
from svdray.train.data_split import DataParallelSplit
from svdray.train.failures import StopOnTrainingFailed
from svdray.tune.objective import ObjectiveReport
from tests.support.paths import REPO

HEAVY = ("torch", "peft", "transformers", "diffusers", "mlflow")


@pytest.mark.parametrize(
    "unpickled",
    [StopOnTrainingFailed, DataParallelSplit, ObjectiveReport, ClipDecoder, probe_batch, read_cached_batch],
    ids=lambda c: c.__name__,
)
def test_what_ray_unpickles_outside_the_workers_imports_only_ray(unpickled: object) -> None:
    module = unpickled.__module__
    probe = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"{unpickled.__name__} is defined in {module}, which imports {out.strip()}"
