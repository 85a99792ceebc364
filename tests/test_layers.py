"""The data layer stands alone: no module of svdray/data imports a model family, training,
tuning, tracking or reward code (parsed imports, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import svdray.data

HIGHER = ("svdray.model", "svdray.models", "svdray.train", "svdray.tune", "svdray.tracking", "svdray.reward")


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


def higher(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in HIGHER)


def test_the_data_layer_imports_nothing_above_it():
    folder = Path(svdray.data.__file__).parent
    modules = sorted(folder.rglob("*.py"))
    assert len(modules) >= 8
    offending = {
        str(path.relative_to(folder)): sorted(m for m in imported_modules(path) if higher(m))
        for path in modules
    }
    assert {k: v for k, v in offending.items() if v} == {}
    # svdray.progress, which the data layer uses, only reaches down into it.
    progress = Path(svdray.data.__file__).parent.parent / "progress.py"
    assert [m for m in imported_modules(progress) if higher(m)] == []


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
