"""Refusing pickles: every weight file svdray reads is safetensors, checked before it is opened.

`torch.load` on a `.pt`/`.bin`/`.ckpt` runs arbitrary code from the file (it is a pickle), so
svdray never calls it. Files and folders a user hands to a command go through these checks first,
so a pickle gets a clear refusal naming the file instead of a loader's traceback. The check looks
at the bytes, not only the name, and decides by structure: a safetensors file is an 8-byte
little-endian header length, a JSON object of that length describing each tensor (dtype, shape,
byte range), then the data those ranges lie in. Only a file that is not one is sniffed for what
torch.save writes (a zip, `PK`, or a raw pickle, `0x80` and its protocol number): the first byte
alone would also match the one safetensors header length in 256 whose low byte is 0x80. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pickletensor"})
# The safetensors format's own limit on the JSON header (safetensors' MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# Bits per element of the safetensors dtypes; a dtype not listed is checked by its byte range only.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4}
DTYPE_BITS |= {"F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16}
DTYPE_BITS |= {"I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


class UnsafeFileError(ValueError):
    """A file that would have to be unpickled to be read."""


def _refusal(path: Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{what}: {path} is a pickle file, which svdray refuses to load (unpickling can run "
        "arbitrary code). Convert it to safetensors first, e.g. "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')` "
        "in a session you trust."
    )


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of `path` if the file is structurally safetensors, else None.

    Structure, not the first bytes: the header length fits the file, the header is a JSON object,
    and every tensor entry has a dtype, a shape and a byte range inside the data that follows (of
    the size its dtype and shape need, for the dtypes listed in DTYPE_BITS). Reads only the header."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (header_len,) = struct.unpack("<Q", head)
        if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            return None
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                return None
        elif not _valid_tensor_entry(entry, data_bytes):
            return None
    return header


def _valid_tensor_entry(entry: object, data_bytes: int) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
        return False
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        return False
    bits = DTYPE_BITS.get(entry["dtype"])
    return bits is None or math.prod(shape) * bits == (end - begin) * 8


def is_safetensors(path: Path) -> bool:
    return safetensors_header(path) is not None


def looks_like_pickle(path: Path) -> bool:
    """By name; else, for a file that is not structurally safetensors, by the bytes torch.save
    writes (a zip archive or a pickle protocol opcode)."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    if is_safetensors(path):
        return False
    with path.open("rb") as f:
        head = f.read(4)
    # A pickle of protocol 2-5 opens with PROTO (0x80) and its protocol number.
    return head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


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


# What torch.distributed.checkpoint's metadata file may name: its own metadata classes, tensor
# sizes, dtypes and layouts, and the checkpoint's path. Nothing that runs code.
_SHARDED_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def check_sharded_state(folder: str | Path, what: str) -> Path:
    """`folder` if it is a sharded state svdray wrote with `torch.distributed.checkpoint`:
    its `.metadata` (a pickle of torch's) names only checkpoint metadata classes, sizes and dtypes
    (read with an unpickler that refuses anything else), every entry is a tensor (DCP unpickles
    non-tensor entries without restriction; svdray writes none) and the shard files it lists
    are plain files of the folder. The shards' tensors are read with `weights_only=True`."""
    import pickle

    import torch

    folder = Path(folder)
    path = folder / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing (not a sharded checkpoint state)")

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if (module, name) not in _SHARDED_METADATA_CLASSES and not dtype:
                raise UnsafeFileError(
                    f"{what}: {path} names {module}.{name}, which is not checkpoint metadata; "
                    "svdray refuses to unpickle it"
                )
            return super().find_class(module, name)

    with path.open("rb") as f:
        try:
            metadata = Unpickler(f).load()
        except UnsafeFileError:
            raise
        except Exception as err:
            raise UnsafeFileError(f"{what}: {path} is not checkpoint metadata ({err})") from None
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(metadata, Metadata):
        raise UnsafeFileError(f"{what}: {path} is not checkpoint metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeFileError(f"{what}: {path}: {key!r} is not a tensor (it would be unpickled)")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
            raise FileNotFoundError(f"{what}: {folder} lacks the shard file {name!r} its metadata lists")
    return folder
