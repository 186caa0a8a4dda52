"""What local files hold: content fingerprints for cache keys, and checks that a file is whole.

Cache keys name a local model directory or dataset by its content, not only by its path, so editing
one in place re-runs what depends on it. A file of at most ``HASH_LIMIT`` bytes (configs,
tokenizers, datasets, small checkpoints) is identified by the SHA-256 of its bytes, so restoring
its old content finds the earlier results again. A larger file (the weight shards of a real model)
is identified by its size and modification time: hashing gigabytes whenever the workflow plans its
jobs would cost more than the occasional recomputation after a ``touch`` or a copy that does not
keep times. Names starting with "." (``.git``, ``.cache``) are not part of a directory's content.

The integrity checks read headers and metadata only, so every intermediate file of a run can be
checked before the first job starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from pathlib import Path

from svnup.io import REBUILD, CorruptFileError, corrupt, open_h5, read_json

HASH_LIMIT = 64 << 20
_CHUNK = 1 << 20
RESTORE = "restore it, or download the model again"
# What transformers loads a model's weights from: one file, or an index naming the shards.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PRUNED_LAYERS = "pruned_layers.h5"  # a run's pruned linear layers, in place of a checkpoint


def refold(folder: str | Path, rebuilds: str = "prunes") -> str:
    """How to recover from a damaged file in a checkpoint folder the workflow builds."""
    return f"delete the folder {folder} and re-run snakemake, which {rebuilds} it again"


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file, computed once per (path, size, mtime, inode) in this process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Path) -> list:
    stat = path.stat()
    if stat.st_size <= HASH_LIMIT:
        return [
            stat.st_size,
            "sha256",
            _sha256(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino),
        ]
    return [stat.st_size, "mtime_ns", stat.st_mtime_ns]


def _files(root: Path) -> list[Path]:
    """Every file under ``root`` in a fixed order, skipping hidden names."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return found


def fingerprint(path: str | Path) -> str:
    """A short hash of what a local file or directory holds (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        entries = [[str(f.relative_to(path)), *_file_identity(f)] for f in _files(path)]
    else:
        entries = [[path.name, *_file_identity(path)]]
    text = json.dumps(entries, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- integrity ------------------------------------------------------------------------------


def check_safetensors(path: str | Path, fix: str = REBUILD) -> None:
    """A safetensors file must hold its whole header and every tensor's bytes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise corrupt(path, f"{size} bytes, shorter than a safetensors header", fix)
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise corrupt(path, f"header of {length} bytes does not fit in {size} bytes", fix)
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise corrupt(path, f"unreadable safetensors header: {error}", fix) from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise corrupt(path, f"{size} bytes where its header promises {expected}", fix)


def check_torch_bin(path: str | Path, fix: str = REBUILD) -> None:
    """A PyTorch weights file is a zip archive (torch.save since 1.6) or a pickle (before)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise corrupt(path, "neither a zip archive nor a pickle, as torch.save writes", fix)


def check_h5(path: str | Path, fix: str = REBUILD) -> None:
    """An HDF5 file must open and list its objects (this reads every object header)."""
    try:
        handle = open_h5(path, "r")
    except CorruptFileError as error:
        raise corrupt(error.path, error.reason, fix) from None
    with handle as f:
        try:
            f.visit(lambda name: None)
        except (OSError, RuntimeError, KeyError) as error:
            raise corrupt(path, error, fix) from None


def check_model_dir(path: str | Path, fix: str = REBUILD) -> None:
    """A Hugging Face model directory holds weights, its safetensors weights and JSON files are
    whole, and every shard that an index names is there. A pruned run's folder may instead hold
    only its pruned layers (``prune --layers-only``), applied to the dense model when it loads."""
    path = Path(path)
    if (path / PRUNED_LAYERS).is_file():
        check_h5(path / PRUNED_LAYERS, fix)
    elif not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CorruptFileError(
            f"{path} holds no model weights ({', '.join(WEIGHT_FILES[::2])} or a shard index); "
            f"{fix}"
        )
    for file in _files(path):
        if file.suffix == ".safetensors":
            check_safetensors(file, fix)
        elif file.suffix == ".bin":
            check_torch_bin(file, fix)
        elif file.suffix == ".json":
            data = read_json(file, fix)
            shards = set(data.get("weight_map", {}).values()) if isinstance(data, dict) else ()
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise corrupt(file, f"shards missing beside it: {', '.join(missing)}", fix)


def check_intact(path: str | Path, fix: str = REBUILD) -> None:
    """Raise a one-line CorruptFileError if an existing file cannot be what its name says."""
    path = Path(path)
    if path.is_dir():
        check_model_dir(path, fix)
    elif not path.exists():
        return
    elif path.suffix == ".h5":
        check_h5(path, fix)
    elif path.suffix == ".json":
        read_json(path, fix)
    elif path.suffix == ".safetensors":
        check_safetensors(path, fix)
