"""Refusing pickles: every weight file svdray reads is safetensors, checked before it is opened.

`torch.load` on a `.pt`/`.bin`/`.ckpt` runs arbitrary code from the file (it is a pickle), so
svdray never calls it. Files and folders a user hands to a command go through these checks first,
so a pickle gets a clear refusal naming the file instead of a loader's traceback. The check looks
at the bytes, not only the name: a safetensors file starts with an 8-byte little-endian header
length followed by the JSON header's `{`; torch.save writes a zip (`PK`) or a raw pickle (`0x80`).
"""

from __future__ import annotations

import struct
from pathlib import Path

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pickletensor"})


class UnsafeFileError(ValueError):
    """A file that would have to be unpickled to be read."""


def _refusal(path: Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{what}: {path} is a pickle file, which svdray refuses to load (unpickling can run "
        "arbitrary code). Convert it to safetensors first, e.g. "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')` "
        "in a session you trust."
    )


def looks_like_pickle(path: Path) -> bool:
    """By name, or by the bytes torch.save writes (a zip archive or a pickle protocol opcode)."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith((b"PK\x03\x04", b"\x80"))


def is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= path.stat().st_size - 8 and head[8:9] == b"{"


def check_safetensors(path: str | Path, what: str) -> Path:
    """`path` if it is a safetensors file; UnsafeFileError for a pickle, FileNotFoundError if absent."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES or (path.is_file() and looks_like_pickle(path)):
        raise _refusal(path, what)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not is_safetensors(path):
        raise UnsafeFileError(
            f"{what}: {path} is not a safetensors file; svdray reads weights only as safetensors"
        )
    return path


def check_folder(path: str | Path, what: str) -> Path:
    """`path` if it is a folder. Refused: a pickle file, a folder whose only weights are pickles,
    and a folder holding a pickle named `.safetensors` (only its top level is looked at)."""
    path = Path(path)
    if path.is_file():
        if looks_like_pickle(path):
            raise _refusal(path, what)
        raise NotADirectoryError(f"{what}: {path} is a file; expected a folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    files = [p for p in path.iterdir() if p.is_file()]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(p.suffix == ".safetensors" for p in files):
        raise _refusal(pickles[0], what)
    for file in files:  # a pickle renamed to .safetensors is refused by its bytes
        if file.suffix == ".safetensors" and looks_like_pickle(file):
            raise _refusal(file, what)
    return path


def check_pipeline_folder(path: str | Path, what: str) -> Path:
    """A diffusers pipeline folder: the folder and each component sub-folder (unet/, vae/, ...)
    pass `check_folder`, so a pipeline saved with pickled weights is refused by name."""
    path = check_folder(path, what)
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        check_folder(sub, what)
    return path
