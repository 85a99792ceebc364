"""What Ray unpickles outside the training workers imports only Ray.

Ray Train's controller and dataset manager unpickle the trainer's callbacks and `dataset_config`;
a Tune trial's controller its `ObjectiveReport`. Each import of the module that defines one of
those happens in a fresh process, once per run: a module that imports torch, peft, diffusers or
MLflow costs every run seconds of CPU in each of those processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import REPO

HEAVY = ("torch", "peft", "transformers", "diffusers", "mlflow")


@pytest.mark.parametrize(
    "module", ["svdray.train.failures", "svdray.train.data_split", "svdray.tune.objective"]
)
def test_what_the_controller_unpickles_imports_only_ray(module: str) -> None:
    probe = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
