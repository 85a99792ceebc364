"""The GPU machine's Python as benchmarks/gpu.py meets it: Ray, MLflow and decord are not there."""

from __future__ import annotations

import os
from pathlib import Path

MISSING = ("ray", "mlflow", "decord")


def gpu_machine_env(folder: Path) -> dict[str, str]:
    """The environment of a subprocess in which importing Ray, MLflow or decord fails, as on the
    GPU machine: a `sitecustomize` in `folder`, first on PYTHONPATH, marks them missing
    (`sys.modules[name] = None`: `import` raises ImportError, `importlib.util.find_spec` says None)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\n\nfor name in {MISSING!r}:\n    sys.modules[name] = None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PYTHONPATH": str(folder)}
