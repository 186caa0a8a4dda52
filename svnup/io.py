"""Small file helpers shared by every stage: atomic writes, strict JSON, and reads that name a
damaged file instead of failing deep inside a library."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

REBUILD = "delete it and re-run snakemake, which rebuilds it"


class CorruptFileError(OSError):
    """A file exists but cannot be read (truncated, overwritten, not what it should be).

    An OSError, so code that retries reads on a flaky network file system still retries it. The
    message is one line: the file, what is wrong, and how to recover.
    """


def corrupt(path: str | Path, reason: object, fix: str = REBUILD) -> CorruptFileError:
    """The error for a damaged ``path``; ``path`` and ``reason`` stay readable as attributes, so
    a caller that knows a better way to recover can restate the fix."""
    reason = " ".join(str(reason).split())  # libraries put newlines and padding in messages
    error = CorruptFileError(f"{path} is truncated or corrupt ({reason}); {fix}")
    error.path, error.reason = str(path), reason
    return error


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (a file or a directory to create) and move it into
    place only if the block succeeds.

    A job killed or failing half-way leaves no output that a workflow manager would take as
    complete; an existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


_H5_LOCKING = {"FALSE": False, "0": False, "TRUE": True, "1": True, "BEST_EFFORT": "best-effort"}


def open_h5(path: str | Path, mode: str = "r"):
    """Open an HDF5 file honouring HDF5_USE_FILE_LOCKING as it is *now*.

    HDF5 reads the variable once, when the library loads, so a value set later (a job script, a
    test) would otherwise be ignored. Unset means the library's own default.
    """
    import h5py

    value = os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper()
    if mode != "r":
        return h5py.File(path, mode, locking=_H5_LOCKING.get(value))
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return h5py.File(path, mode, locking=_H5_LOCKING.get(value))
    except OSError as error:
        if "unable to lock file" in str(error):  # a held lock is no damage: callers retry
            raise
        raise corrupt(path, error) from None


def _finite(value):
    """Replace NaN/inf (not valid JSON) by null, keeping the rest of the structure."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, data) -> None:
    """Write strict JSON atomically: non-finite numbers become null, never NaN/Infinity."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path, fix: str = REBUILD):
    """Parse a JSON file; a damaged one is a CorruptFileError that names it and says ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise corrupt(path, f"not UTF-8 text at byte {error.start}", fix) from None
    except ValueError as error:
        raise corrupt(path, f"not valid JSON: {error}", fix) from None


def write_scores(path: str | Path, values, stderr=None, **meta) -> None:
    """Per-block scores in the one format every allocation method reads: values (per block, or
    per level and block with the ``levels`` they were measured at), standard errors (null where
    the source has none) and what produced them."""
    values = _floats(values)
    stderr = _floats(stderr) if stderr is not None else _floats(values, lambda v: None)
    write_json(path, {"values": values, "stderr": stderr, **meta})


def _floats(values, convert=float):
    """A nested list of ``convert``ed numbers (None stays None)."""
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        return None if values is None else convert(values)
    return [_floats(v, convert) for v in values]


def read_scores(path: str | Path) -> tuple[list[float], list[float | None], dict]:
    """(values, stderr, the rest) of a file written by ``write_scores``."""
    data = read_json(path)
    return data.pop("values"), data.pop("stderr"), data


class JsonLines:
    """An append-only journal of JSON rows, fsynced per row, for work that must survive a kill.

    A last line without its newline is the torn write of a killed process and is ignored; a
    damaged line before it is a CorruptFileError that names the line.
    """

    FIX = "delete it and re-run: the work it journalled is done again"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows = []
        for number, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                reason = f"line {number} column {error.colno} is not valid JSON: {error.msg}"
                raise corrupt(self.path, reason, self.FIX) from None
            except UnicodeDecodeError:
                raise corrupt(self.path, f"line {number} is not UTF-8 text", self.FIX) from None
        return rows

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write((json.dumps(_finite(row), allow_nan=False) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
