"""Crash-safe store of evaluated coalitions, shared by concurrent cluster jobs.

Why this layout: an evaluation costs GPU minutes, jobs get killed, and several jobs (one per sliding
window) write into the same directory on NFS/Lustre, where an HDF5 file must never be written by two
processes and byte-range locks are unreliable. So each job appends to its own JSON-lines journal
(fsync per coalition), and the published HDF5 file is only ever replaced whole, under a mkdir lock::

    <root>/coalitions.h5        published records; rewritten to a temp file, fsynced, os.replace'd
    <root>/journal/<tag>.jsonl  one writer's journal: a header line
                                {"journal": 1, "tag", "pid", "host", "start"}, then one line
                                {"mask": hex, "nll_sum", "n_tokens", "seconds"} per coalition
    <root>/.lock/               publishing lock (atomic os.mkdir; owner.json inside)

A writer may claim coalitions before evaluating them: the claim is listed in its journal header
(``"claims": [hex, ...]``) and in later ``{"claims": [...]}`` lines, and is decided under the lock
from what is recorded and what live writers have claimed, so concurrent jobs (of one estimator or
of several sharing the store) never evaluate a coalition twice. A claim lives as long as its
journal's writer: on this host while the process runs, from another host while the journal's
modification time, refreshed by a heartbeat, is younger than ``stale_lock_s``. The claims of a
killed job are taken over by whoever waits for them.

A last journal line without its newline is the torn write of a killed job and is ignored.
Readers read the journals before the published file, and publishing replaces the file before it
deletes journals, so a reader never misses a record. A journal has one writer at a time: a second
process running the same job (two workflow runs sharing a job, or a re-run after ``snakemake
--unlock`` while the first still runs) waits until that journal's writer has ended, and takes the
journal over as soon as it is judged dead, as claims are. ``publish()`` without tags merges only
journals written on this host by processes that have exited (``start`` guards against pid reuse);
a journal from another host is merged by the next writer with its tag or by
``publish(tags=[...])``. HDF5 file locking follows HDF5_USE_FILE_LOCKING; set it to
FALSE on file systems without flock support. This module never sets it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from operator import index
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from svnup import __version__
from svnup.io import CorruptFileError, corrupt, open_h5

PUBLISHED = "coalitions.h5"
JOURNALS = "journal"
LOCK = ".lock"
_FIELDS = ("nll_sum", "n_tokens", "seconds")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ACTIVE: set[Path] = set()  # journals held open by writers of this process
_MISSING = object()
DAMAGED_STORE = (
    "delete it and re-run: coalitions still in the journals beside it are kept, the others are "
    "evaluated again"
)
DAMAGED_JOURNAL = "move it aside and re-run: its coalitions are evaluated again"
log = logging.getLogger("svnup.store")


@dataclass(frozen=True)
class CoalitionRecord:
    """One evaluation of a coalition: summed token NLL, tokens scored, wall-clock seconds."""

    nll_sum: float
    n_tokens: int
    seconds: float


def _normalised(record: CoalitionRecord) -> CoalitionRecord:
    return CoalitionRecord(float(record.nll_sum), int(record.n_tokens), float(record.seconds))


def _check_n_blocks(n_blocks: int) -> int:
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int | np.integer) or n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks!r} must be a positive int (the model's block count)")
    return int(n_blocks)


def _check_mask(mask: int, n_blocks: int, name: str) -> int:
    try:
        mask = index(mask)
    except TypeError:
        raise ValueError(f"{name}: mask {mask!r} is not an int bitmask") from None
    if not 0 <= mask < 1 << n_blocks:
        raise ValueError(f"{name}: mask {mask:#x} is outside 0 .. 2**{n_blocks} - 1 (n_blocks)")
    return mask


def _attrs(f: h5py.File) -> dict[str, Any]:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink durable; some file systems refuse fsync on directories: fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> Path:
    """A hidden temp name in the target's directory, so os.replace stays on one file system."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _replace_bytes(path: Path, data: bytes) -> None:
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_records(
    path: str | Path, records: dict[int, CoalitionRecord], n_blocks: int, attrs: dict[str, Any]
) -> None:
    """Write records in the store's HDF5 layout, atomically (temp file, fsync, os.replace).

    Masks become little-endian uint8 rows of ceil(n_blocks / 8) bytes, so models with more than 64
    blocks fit. attrs values must be str, int, float or bool (JSON-encode anything richer).
    """
    path = Path(path)
    n_blocks = _check_n_blocks(n_blocks)
    if attrs.get("n_blocks", n_blocks) != n_blocks:
        raise ValueError(
            f"attrs['n_blocks']={attrs['n_blocks']!r} differs from n_blocks={n_blocks}"
        )
    for key, value in attrs.items():
        if not isinstance(value, str | int | float | bool | np.generic):
            raise ValueError(
                f"attrs[{key!r}] is a {type(value).__name__}; store it as a JSON string"
            )
    nbytes = (n_blocks + 7) // 8
    raw = b"".join(_check_mask(m, n_blocks, "records").to_bytes(nbytes, "little") for m in records)
    values = [_normalised(r) for r in records.values()]
    tmp = _temp_beside(path)
    try:
        with open_h5(tmp, "w") as f:
            f.create_dataset("mask", data=np.frombuffer(raw, np.uint8).reshape(len(values), nbytes))
            f.create_dataset("nll_sum", data=np.array([r.nll_sum for r in values], np.float64))
            f.create_dataset("n_tokens", data=np.array([r.n_tokens for r in values], np.int64))
            f.create_dataset("seconds", data=np.array([r.seconds for r in values], np.float64))
            f.attrs.update(attrs)
            f.attrs["n_blocks"] = n_blocks
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_records(path: str | Path) -> tuple[dict[int, CoalitionRecord], dict[str, Any]]:
    """Read a file written by write_records: (records by mask, attributes as Python values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_records: no file at path={path}")
    with open_h5(path, "r") as f:
        attrs = _attrs(f)
        try:
            masks, nll, tokens, secs = (f[name][()] for name in ("mask", *_FIELDS))
        except KeyError as err:
            raise ValueError(
                f"{path} is not a coalition record file (a coalitions job's output: {err}); give "
                "one, or delete it and re-run snakemake, which rebuilds it"
            ) from None
    records: dict[int, CoalitionRecord] = {}
    for row, a, b, c in zip(masks, nll, tokens, secs, strict=True):
        record = CoalitionRecord(float(a), int(b), float(c))
        records.setdefault(int.from_bytes(row.tobytes(), "little"), record)
    return records, attrs


def _versions() -> dict[str, str | None]:
    """Library versions behind the store, from package metadata: torch and transformers are neither
    imported nor required here."""
    versions: dict[str, str | None] = {
        "svnup": __version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _start_time(pid: int) -> int | None:
    """Start time of a running, non-zombie process, or None; it tells a reused pid from the process
    that wrote a journal. Without /proc it only says whether the pid exists (0)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


def _running_here(owner: dict[str, Any], path: Path | None = None) -> bool:
    """Whether owner (pid/host/start) is a live process on this host. Journal writers of this very
    process count only while open (path in _ACTIVE); other hosts cannot be inspected: False."""
    if owner.get("host") != socket.gethostname():
        return False
    if owner.get("pid") == os.getpid() and path is not None:
        return path in _ACTIVE
    return _start_time(owner["pid"]) == owner.get("start")


def _record_line(mask: int, record: CoalitionRecord) -> bytes:
    record = _normalised(record)
    fields = {"mask": format(mask, "x"), **{k: getattr(record, k) for k in _FIELDS}}
    return (json.dumps(fields) + "\n").encode()


def _parse_journal(
    path: Path,
) -> tuple[dict[str, Any] | None, list[tuple[int, CoalitionRecord]], set[int]]:
    """Header (None if absent), records and claimed masks of the complete lines; a torn last
    line is ignored."""
    data = path.read_bytes()
    header, records, claims = None, [], set()
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n")[:-1], 1):
        try:
            entry = json.loads(line)
            if number == 1 and "journal" in entry:
                header = entry
                claims.update(int(m, 16) for m in entry.get("claims", []))
                continue
            if "claims" in entry:
                claims.update(int(m, 16) for m in entry["claims"])
                continue
            record = _normalised(CoalitionRecord(*(entry[k] for k in _FIELDS)))
            records.append((int(entry["mask"], 16), record))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"corrupt journal {path} line {number}: {err!r}; {DAMAGED_JOURNAL}"
            ) from None
    return header, records, claims


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[tuple[int, CoalitionRecord]]]:
    """Header (None if absent) and records of the complete lines; a torn last line is ignored."""
    header, records, _ = _parse_journal(path)
    return header, records


def check_store(root: str | Path) -> None:
    """Raise a one-line CorruptFileError if the published file or a journal under ``root`` is
    damaged; reads metadata and journals only, so a workflow can check before planning."""
    root = Path(root)
    published = root / PUBLISHED
    if published.exists():
        try:
            with open_h5(published, "r") as f:
                missing = [name for name in ("mask", *_FIELDS) if name not in f]
        except CorruptFileError as error:
            raise corrupt(error.path, error.reason, DAMAGED_STORE) from None
        if missing:
            raise corrupt(published, f"no {', '.join(missing)}", DAMAGED_STORE)
    for path in sorted((root / JOURNALS).glob("*.jsonl")):
        try:
            _parse_journal(path)
        except ValueError as error:
            raise CorruptFileError(str(error)) from None


class _DirLock:
    """Inter-process lock that works on NFS, where os.mkdir is atomic but flock often is not."""

    def __init__(
        self,
        path: Path,
        timeout_s: float,
        stale_s: float,
        poll_s: tuple[float, float] = (0.01, 0.05),
    ) -> None:
        self._path, self._timeout_s, self._stale_s = path, timeout_s, stale_s
        self._poll_s = poll_s
        self._token = ""

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads((self._path / "owner.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def _stale_reason(self) -> str | None:
        owner = self._owner()
        if owner and owner.get("host") == socket.gethostname() and not _running_here(owner):
            return f"its owner pid {owner['pid']} on this host has exited"
        try:
            since = owner["time"] if owner else self._path.stat().st_mtime
        except FileNotFoundError:
            return None
        if time.time() - since > self._stale_s:
            return f"older than {self._stale_s:.0f} s"
        return None

    def _break_if_stale(self) -> bool:
        """Remove a dead owner's lock. The .break guard keeps a slow waiter that also judged the
        lock stale from removing the fresh lock a faster waiter has just taken."""
        if self._stale_reason() is None:
            return False
        guard = self._path.with_name(self._path.name + ".break")
        try:
            os.mkdir(guard)
        except FileExistsError:
            with suppress(OSError):  # the guard may vanish meanwhile
                if time.time() - guard.stat().st_mtime > self._stale_s:
                    guard.rmdir()  # its breaker died in the act
            return False
        try:
            reason = self._stale_reason()
            if reason is None:
                return False
            self._breaking(reason)
            shutil.rmtree(self._path, ignore_errors=True)
            return True
        finally:
            guard.rmdir()

    def __enter__(self) -> _DirLock:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                os.mkdir(self._path)
                break
            except FileExistsError:
                if self._break_if_stale():
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"lock {self._path} not acquired within {self._timeout_s:.0f} s; held by "
                    f"{self._owner()}; if no publisher is running, remove that directory"
                )
            self._waiting()
            time.sleep(random.uniform(*self._poll_s))
        self._token = uuid.uuid4().hex
        self.beat()
        return self

    def _waiting(self) -> None:
        """Called before each sleep while another process holds the lock."""

    def _breaking(self, reason: str) -> None:
        warnings.warn(
            f"breaking stale lock {self._path} ({reason}); owner: {self._owner()}", stacklevel=4
        )

    def beat(self) -> None:
        """Write the owner file with the current time: a lock held for long stays fresh."""
        owner = {**_me(), "time": time.time(), "token": self._token}
        with suppress(FileNotFoundError):  # broken by someone who judged it stale: see __exit__
            _replace_bytes(self._path / "owner.json", json.dumps(owner).encode())

    def __exit__(self, *exc: object) -> None:
        owner = self._owner()
        if owner is None or owner.get("token") != self._token:
            warnings.warn(f"lock {self._path} was broken while held; leaving it", stacklevel=2)
            return
        (self._path / "owner.json").unlink()
        self._path.rmdir()


class _JobLock(_DirLock):
    """A _DirLock held while a whole job runs (see ``held``); it logs once whom it waits for."""

    _told = False

    def _waiting(self) -> None:
        if not self._told:
            self._told = True
            log.info("%s is held by %s, which runs the same job; waiting for it", *self._holder())

    def _breaking(self, reason: str) -> None:
        """A job killed before it could release its lock is the usual case: said in the log."""
        log.info("taking over %s from a job that is gone (%s)", self._path, reason)

    def _holder(self) -> tuple[Path, str]:
        owner = self._owner() or {}
        return self._path, f"pid {owner.get('pid')} on {owner.get('host')}"


@contextmanager
def held(path: str | Path, stale_s: float = 600.0, poll_s: float = 0.5) -> Iterator[None]:
    """Run the block as the only holder of the lock folder ``path``, for jobs that journal their
    work outside a coalition store (ATP's search). A second process running the same job waits
    until the first has ended, or has died: on this host its pid has exited, on another host its
    heartbeat (every ``stale_s / 4`` s, at most a minute) is older than ``stale_s``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _JobLock(Path(path), math.inf, stale_s, (poll_s, poll_s))
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(min(60.0, stale_s / 4)):
            lock.beat()

    with lock:
        thread = threading.Thread(target=heartbeat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            beating.set()
            thread.join()


class CoalitionStore:
    """Evaluated coalitions of one (model, calibration, probe, ablation, evaluation set) identity.

    ``path`` is the published HDF5 file. It is created (empty) on first use, which pins the identity
    and n_blocks: a later store on the same root with different ones is refused.
    """

    def __init__(
        self,
        root: str | Path,
        n_blocks: int,
        identity: dict[str, Any],
        *,
        lock_timeout_s: float = 900.0,
        stale_lock_s: float = 600.0,
    ) -> None:
        if not isinstance(identity, dict):
            raise ValueError(f"identity must be a dict, got {type(identity).__name__}")
        try:
            self._identity_json = json.dumps(identity, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"identity must be JSON-serialisable: {err}") from None
        self._identity = json.loads(self._identity_json)
        self._n_blocks = _check_n_blocks(n_blocks)
        self._root = Path(root).resolve()
        self._lock_args = (lock_timeout_s, stale_lock_s)
        (self._root / JOURNALS).mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with self._lock():
                if not self.path.exists():
                    attrs = {
                        "identity": self._identity_json,
                        "versions": json.dumps(_versions()),
                        "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                    write_records(self.path, {}, self._n_blocks, attrs)
        try:
            with open_h5(self.path, "r") as f:
                self._check_identity(_attrs(f))
        except CorruptFileError as error:
            raise corrupt(error.path, error.reason, DAMAGED_STORE) from None

    @property
    def identity(self) -> dict[str, Any]:
        return json.loads(self._identity_json)

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    @property
    def path(self) -> Path:
        return self._root / PUBLISHED

    def _lock(self) -> _DirLock:
        return _DirLock(self._root / LOCK, *self._lock_args)

    def _journal(self, tag: str) -> Path:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(
                f"tag={tag!r}: use letters, digits, '-', '_', '.' (e.g. 'window-0004')"
            )
        return self._root / JOURNALS / f"{tag}.jsonl"

    def _journals(self) -> list[Path]:
        return sorted((self._root / JOURNALS).glob("*.jsonl"))

    def _check_identity(self, attrs: dict[str, Any]) -> None:
        try:
            stored = {**json.loads(attrs["identity"]), "n_blocks": attrs.get("n_blocks")}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path} is not a coalition store; choose another root") from None
        given = {**self._identity, "n_blocks": self._n_blocks}
        differ = sorted(
            k
            for k in stored.keys() | given.keys()
            if stored.get(k, _MISSING) != given.get(k, _MISSING)
        )
        if differ:
            shown = ", ".join(f"{k}: {stored.get(k)!r} vs {given.get(k)!r}" for k in differ)
            raise ValueError(
                f"{self.path} belongs to another identity (stored vs given: {shown}); "
                "use a separate root for this run"
            )

    def _published(self) -> dict[int, CoalitionRecord]:
        """Published records, retried: on NFS a reader can get ESTALE when another client replaces
        the file while it reads."""
        for delay in (0.05, 0.1, 0.2):
            try:
                return read_records(self.path)[0]
            except OSError:
                time.sleep(delay)
        return read_records(self.path)[0]

    def records(self, include_journals: bool = True) -> dict[int, CoalitionRecord]:
        """Published records plus every journal's complete lines (the published record wins)."""
        pending = []
        for path in self._journals() if include_journals else []:
            try:
                pending.append(_read_journal(path)[1])
            except FileNotFoundError:  # published and deleted since listed: read below
                continue
        merged = self._published()
        for entries in pending:
            for mask, record in entries:
                merged.setdefault(mask, record)
        return merged

    def missing(self, masks: Iterable[int]) -> list[int]:
        """The masks not recorded yet, in the given order, without repeats."""
        done = set(self.records())
        todo: list[int] = []
        for mask in masks:
            mask = _check_mask(mask, self._n_blocks, "masks")
            if mask not in done:
                done.add(mask)
                todo.append(mask)
        return todo

    def writer(
        self, tag: str, claim: Iterable[int] | None = None, poll_s: float = 0.5
    ) -> JournalWriter:
        """A context manager appending to journal/<tag>.jsonl; use one tag per job (a second
        writer of a tag waits for the first, see ``JournalWriter``).

        With ``claim``, entering claims those masks that are neither recorded nor claimed by a
        live writer (``JournalWriter.claimed``); see ``JournalWriter.take_over`` for the rest.
        """
        return JournalWriter(self, tag, claim, poll_s)

    def _alive(self, header: dict[str, Any], path: Path) -> bool:
        """Whether a journal's writer still runs: its process on this host, or a heartbeat younger
        than the stale-lock age for another host."""
        if header.get("host") == socket.gethostname():
            return _running_here(header, path)
        try:
            return time.time() - path.stat().st_mtime < self._lock_args[1]
        except FileNotFoundError:
            return False

    def _live_claims(self, exclude: Path) -> set[int]:
        """Masks claimed by the live writers of other journals. The caller holds the lock."""
        claims: set[int] = set()
        for path in self._journals():
            if path == exclude:
                continue
            try:
                header, _, claimed = _parse_journal(path)
            except FileNotFoundError:  # published since listed
                continue
            if header and claimed and self._alive(header, path):
                claims |= claimed
        return claims

    def publish(self, tags: Iterable[str] | None = None) -> int:
        """Merge journals into coalitions.h5 and delete them; returns how many records are new.

        Without tags: the journals written on this host by processes that have exited. With tags:
        those journals, wherever written (the caller vouches that their jobs are over), except one
        a live process on this host still writes, which raises RuntimeError.
        """
        if isinstance(tags, str):
            raise ValueError(f"tags={tags!r} must be a list of tags, e.g. [{tags!r}]")
        with self._lock():
            if tags is None:
                here = socket.gethostname()
                paths = []
                for path in self._journals():
                    header = _read_journal(path)[0]
                    if header and header["host"] == here and not _running_here(header, path):
                        paths.append(path)
            else:
                paths = [p for p in map(self._journal, tags) if p.exists()]
                for path in paths:
                    header = _read_journal(path)[0]
                    if header and _running_here(header, path):
                        raise RuntimeError(
                            f"journal {path} is still written by pid {header['pid']}"
                        )
            return self._merge(paths)

    def _merge(self, paths: list[Path]) -> int:
        """Published records first, then journals in order; the first record of a mask wins.
        The caller holds the lock."""
        published, attrs = read_records(self.path)
        self._check_identity(attrs)
        merged = dict(published)
        for path in paths:
            for mask, record in _read_journal(path)[1]:
                merged.setdefault(mask, record)
        if len(merged) > len(published):
            write_records(self.path, merged, self._n_blocks, attrs)
        for path in paths:
            path.unlink()
        _fsync_dir(self._root / JOURNALS)
        return len(merged) - len(published)


class JournalWriter:
    """Appends one job's evaluations to its journal and publishes them when the job ends.

    Entering takes over journal/<tag>.jsonl left by a killed job with this tag: its complete lines
    count as done and the torn tail is dropped. While another process's writer of this tag is
    alive (the same job run twice), entering waits for it to end first, polling every ``poll_s``
    seconds. With a claim, entering also claims the masks this writer is to evaluate
    (``claimed``). While open, a heartbeat refreshes the journal's time so
    writers on other hosts see the claim is alive. Leaving normally or by an Exception publishes
    the journal; KeyboardInterrupt, SystemExit and signals leave it for the next writer of this
    tag or ``publish()``.
    """

    def __init__(
        self,
        store: CoalitionStore,
        tag: str,
        claim: Iterable[int] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self._store, self._tag, self._path = store, tag, store._journal(tag)
        self._poll_s = poll_s
        self._fd: int | None = None
        self._done: set[int] = set()
        self._claim = None if claim is None else self._checked(claim)
        self.claimed: list[int] = []
        self._beating = threading.Event()

    def _checked(self, masks: Iterable[int]) -> list[int]:
        checked = (_check_mask(m, self._store.n_blocks, "claim") for m in masks)
        return list(dict.fromkeys(checked))

    def __enter__(self) -> JournalWriter:
        if self._fd is not None:
            raise RuntimeError(f"writer {self._tag!r} is already open")
        if self._path in _ACTIVE:
            raise RuntimeError(f"journal {self._path} is already open in this process")
        told = False
        while (holder := self._open()) is not None:
            if not told:
                log.info(
                    "journal %s is written by pid %s on %s, which runs the same job; waiting for "
                    "it to end",
                    self._path,
                    holder.get("pid"),
                    holder.get("host"),
                )
                told = True
            time.sleep(self._poll_s)
        self._beating.clear()
        interval = min(60.0, self._store._lock_args[1] / 4)
        threading.Thread(target=self._heartbeat, args=(interval,), daemon=True).start()
        return self

    def _open(self) -> dict[str, Any] | None:
        """Open the journal, taking over what a dead writer of this tag left in it; while a live
        writer in another process still holds it, return that writer's header instead."""
        with self._store._lock():
            kept: list[tuple[int, CoalitionRecord]] = []
            if self._path.exists():
                header, kept = _read_journal(self._path)
                if header and self._store._alive(header, self._path):
                    return header
            # read under the lock: publishing (which deletes journals) cannot run in between
            self._done = set(self._store.records())  # includes what a killed predecessor wrote
            if self._claim is not None:
                taken = self._store._live_claims(exclude=self._path)
                self.claimed = [m for m in self._claim if m not in self._done | taken]
            header = {"journal": 1, "tag": self._tag, **_me()}
            if self.claimed:
                header["claims"] = [format(m, "x") for m in self.claimed]
            body = (json.dumps(header) + "\n").encode()
            body += b"".join(_record_line(m, r) for m, r in kept)
            _replace_bytes(self._path, body)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
            _ACTIVE.add(self._path)
        return None

    def _heartbeat(self, interval: float) -> None:
        while not self._beating.wait(interval):
            with suppress(OSError):
                os.utime(self._path)

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def append(self, mask: int, record: CoalitionRecord) -> None:
        """Journal one evaluation durably; a no-op if the mask was recorded when this writer opened
        or appended since (publishing dedupes whatever else overlaps)."""
        if self._fd is None:
            raise RuntimeError("append() outside `with store.writer(tag) as w:`")
        mask = _check_mask(mask, self._store.n_blocks, "mask")
        if not 0 <= index(record.n_tokens) < 1 << 63:
            raise ValueError(f"record.n_tokens={record.n_tokens} must fit int64 (>= 0)")
        if mask in self._done:
            return
        self._write(_record_line(mask, record))
        self._done.add(mask)

    def take_over(self, masks: Iterable[int], poll_s: float = 0.5) -> list[int]:
        """Wait until every one of ``masks`` is recorded, and return [] then; or, as soon as some
        of them are claimed by nobody alive (their writer was killed), claim those and return
        them for the caller to evaluate before it calls again."""
        if self._fd is None:
            raise RuntimeError("take_over() outside `with store.writer(tag) as w:`")
        masks = self._checked(masks)
        while True:
            with self._store._lock():
                done = set(self._store.records())
                pending = [m for m in masks if m not in done]
                if not pending:
                    return []
                live = self._store._live_claims(exclude=self._path)
                orphans = [m for m in pending if m not in live]
                if orphans:
                    self._write(
                        (json.dumps({"claims": [format(m, "x") for m in orphans]}) + "\n").encode()
                    )
                    self.claimed += orphans
                    return orphans
            time.sleep(poll_s)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._beating.set()
        os.close(self._fd)
        self._fd = None
        _ACTIVE.discard(self._path)
        if exc_type is None or issubclass(exc_type, Exception):
            self._store.publish(tags=[self._tag])
