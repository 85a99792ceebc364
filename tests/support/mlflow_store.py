"""Empty MLflow stores for the tests, made once per test process and copied.

MLflow makes a new sqlite store by creating its tables and running every alembic migration since
(seconds of CPU on a 2-core machine, for each of the integration tier's two dozen stores). A copy
of a store MLflow itself made and migrated is the same database: the runs then use MLflow as
they would use a store of their own.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SQLITE = "sqlite:///"
_template: Path | None = None


def template_store() -> Path:
    """This process's empty, migrated store (made on first use)."""
    global _template
    if _template is None:
        from mlflow.tracking import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(tracking_uri=SQLITE + str(path)).search_experiments()  # creates and migrates
        _template = path
    return _template


def seed_store(uri_or_path: str | Path) -> None:
    """Put an empty, migrated store where a sqlite tracking URI (or a path) points, unless a
    store is already there; other URIs are left alone."""
    text = str(uri_or_path)
    if "://" in text and not text.startswith(SQLITE):
        return
    path = Path(text[len(SQLITE) :] if text.startswith(SQLITE) else text)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template_store(), path)
