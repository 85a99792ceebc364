"""Folders follow the data and a layer imports only the layers before it: svdray/data imports no
model family, training, tuning, tracking or reward code; the model families import nothing of
training, tuning or reward; training nothing of tuning or reward (parsed imports, including those
inside functions). And only a family's own files name its model classes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import svdray

PACKAGE = Path(svdray.__file__).parent
HIGHER = ("svdray.model", "svdray.models", "svdray.train", "svdray.tune", "svdray.tracking", "svdray.reward")
# package -> what it must not import (svdray.config, console, safeload, progress, actors serve
# every layer)
LAYERS = {
    "data": HIGHER,
    "models": (
        "svdray.train",
        "svdray.tune",
        "svdray.tracking",
        "svdray.reward",
        "svdray.jobs",
        "svdray.cli",
    ),
    "train": ("svdray.tune", "svdray.reward", "svdray.jobs", "svdray.cli"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names (`from svdray import tracking` names
    svdray.tracking)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(
                f"{path}: relative import at line {node.lineno}; the checks read absolute ones"
            )
    return names


def higher(module: str, above: tuple[str, ...] = HIGHER) -> bool:
    return any(module == name or module.startswith(name + ".") for name in above)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_nothing_above_it(layer):
    folder = PACKAGE / layer
    modules = sorted(folder.rglob("*.py"))
    assert len(modules) >= 5
    offending = {
        str(path.relative_to(folder)): sorted(m for m in imported_modules(path) if higher(m, LAYERS[layer]))
        for path in modules
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_progress_and_the_actor_helpers_stay_below_the_data_layer():
    """progress.py (the progress board) and actors.py (the named-actor helper it shares with the
    data ledger) import nothing of svdray/data or above; actors.py nothing of svdray at all."""
    below_data = ("svdray.data", *HIGHER)
    assert [m for m in imported_modules(PACKAGE / "progress.py") if higher(m, below_data)] == []
    assert [m for m in imported_modules(PACKAGE / "actors.py") if m.startswith("svdray")] == []


MODEL_CLASSES = re.compile(
    r"StableVideoDiffusion|UNetSpatioTemporal|added_time_ids|AutoencoderKLTemporalDecoder"
)


def test_only_the_svd_family_names_svd_classes():
    naming = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if MODEL_CLASSES.search(p.read_text())
    )
    assert naming and all(p.startswith("models/svd/") for p in naming), naming


def test_the_import_check_sees_every_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import svdray.train.loop\nfrom svdray import tracking\n"
        "def f():\n    from svdray.models.svd.cache import SVD_CACHE\n"
        "from svdray.data.video import motion_score\nfrom svdray.modelsx import y\n"
    )
    assert sorted(m for m in imported_modules(source) if higher(m)) == [
        "svdray.models.svd.cache",
        "svdray.models.svd.cache.SVD_CACHE",
        "svdray.tracking",
        "svdray.train.loop",
    ]
