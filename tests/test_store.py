"""The coalition store survives killed jobs, concurrent readers and concurrent publishers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from svnup.store import (
    CoalitionRecord,
    CoalitionStore,
    check_store,
    held,
    read_records,
    write_records,
)

N = 12
IDENTITY = {"model": "tiny", "calibration": "c4:128", "probe": "wikitext", "ablation": "block"}
CTX = multiprocessing.get_context("fork")  # children inherit the test's imports: fast and simple


def rec(mask: int) -> CoalitionRecord:
    """A record derived from the mask, so any reader can check what it sees is exact."""
    return CoalitionRecord(nll_sum=mask * 0.1 + 1 / 3, n_tokens=mask % 1000 + 7, seconds=mask / 7)


def journal(root: Path, tag: str) -> Path:
    return root / "journal" / f"{tag}.jsonl"


def _append_then_die(root: Path, tag: str, masks: list[int]) -> None:
    """A job killed while writing its sixth record: SIGKILL runs no cleanup at all."""
    store = CoalitionStore(root, N, IDENTITY)
    with store.writer(tag) as w:
        for mask in masks:
            w.append(mask, rec(mask))
        with open(journal(root, tag), "ab") as f:
            f.write(b'{"mask": "fff", "nll_sum": 0.12')
        os.kill(os.getpid(), signal.SIGKILL)


def kill_a_writer(root: Path, tag: str, masks: list[int]) -> None:
    child = CTX.Process(target=_append_then_die, args=(root, tag, masks))
    child.start()
    child.join(timeout=20)
    assert child.exitcode == -signal.SIGKILL


def test_write_read_round_trip_with_wide_masks(tmp_path):
    records = {0: rec(0), 1 << 69: rec(5), (1 << 70) - 1: rec(9), 0b101: rec(3)}
    path = tmp_path / "window.h5"
    write_records(path, records, 70, {"window": "0004-0008", "seed": 3})
    got, attrs = read_records(path)
    assert got == records and list(got) == list(records)
    assert attrs == {"window": "0004-0008", "seed": 3, "n_blocks": 70}
    with h5py.File(path, "r") as f:
        assert f["mask"].dtype == np.uint8 and f["mask"].shape == (4, 9)
        assert f["mask"][1].tolist() == [0] * 8 + [0x20]  # bit 69 = byte 8, bit 5
        assert f["n_tokens"].dtype == np.int64 and f["nll_sum"].dtype == np.float64
    write_records(path, {}, 70, {})
    assert read_records(path) == ({}, {"n_blocks": 70})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["window.h5"]  # no temp files left


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_records(tmp_path / "x.h5", {1 << 8: rec(1)}, 8, {})
    with pytest.raises(ValueError, match="JSON string"):
        write_records(tmp_path / "x.h5", {}, 8, {"identity": {"model": "m"}})
    with pytest.raises(FileNotFoundError, match="path="):
        read_records(tmp_path / "absent.h5")
    store = CoalitionStore(tmp_path / "s", N, IDENTITY)
    with pytest.raises(ValueError, match="tag="):
        store.writer("../escape")
    with pytest.raises(ValueError, match="masks"):
        store.missing([-1])
    with store.writer("w") as w:
        with pytest.raises(ValueError, match="outside"):
            w.append(1 << N, rec(1))
        with pytest.raises(ValueError, match="int64"):
            w.append(1, CoalitionRecord(0.0, 1 << 63, 0.0))


def test_store_keeps_records_of_70_blocks(tmp_path):
    store = CoalitionStore(tmp_path, 70, IDENTITY)
    masks = [0, 1 << 69, (1 << 70) - 1, 5]
    with store.writer("window-0000-0070") as w:
        for mask in masks:
            w.append(mask, rec(mask))
    assert not journal(tmp_path, "window-0000-0070").exists()
    assert store.records() == {m: rec(m) for m in masks}
    published, attrs = read_records(store.path)
    assert published == {m: rec(m) for m in masks} and attrs["n_blocks"] == 70
    assert json.loads(attrs["identity"]) == IDENTITY and attrs["created"]
    assert set(json.loads(attrs["versions"])) == {"svnup", "torch", "transformers", "h5py", "numpy"}
    assert store.missing([5, 6, 1 << 69, 6, 7]) == [6, 7]


def test_identity_mismatch_names_the_keys(tmp_path):
    CoalitionStore(tmp_path, N, IDENTITY)
    CoalitionStore(tmp_path, N, dict(reversed(IDENTITY.items())))  # key order is irrelevant
    with pytest.raises(ValueError, match=r"model: 'tiny' vs 'other'") as err:
        CoalitionStore(tmp_path, N, {**IDENTITY, "model": "other", "eval": "ptb"})
    assert "eval" in str(err.value) and "n_blocks" not in str(err.value)
    with pytest.raises(ValueError, match="n_blocks: 12 vs 13"):
        CoalitionStore(tmp_path, N + 1, IDENTITY)


def test_restart_after_kill_resumes_where_the_job_died(tmp_path):
    todo = list(range(1, 11))
    kill_a_writer(tmp_path, "window-0004-0008", todo[:5])
    path = journal(tmp_path, "window-0004-0008")
    assert not path.read_bytes().endswith(b"\n")  # the torn line
    store = CoalitionStore(tmp_path, N, IDENTITY)
    assert store.records() == {m: rec(m) for m in todo[:5]}
    with store.writer("window-0004-0008") as w:
        lines = path.read_bytes().split(b"\n")
        assert len(lines) == 7 and lines[-1] == b""  # header + the 5 done, torn tail dropped
        assert store.missing(todo) == todo[5:]
        for mask in store.missing(todo):
            w.append(mask, rec(mask))
    assert read_records(store.path)[0] == {m: rec(m) for m in todo}
    assert not path.exists()


def test_publish_merges_only_journals_of_exited_writers_here(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    kill_a_writer(tmp_path, "dead", [1, 2, 3, 4, 5])
    header = {"journal": 1, "tag": "remote", "pid": 1, "host": "elsewhere", "start": 0}
    lines = [
        json.dumps(header),
        json.dumps({"mask": "64", "nll_sum": 0.5, "n_tokens": 9, "seconds": 1.0}),
    ]
    journal(tmp_path, "remote").write_text("\n".join(lines) + "\n")
    with store.writer("live") as w:
        w.append(50, rec(50))
        assert store.publish() == 5  # "dead" only
        assert not journal(tmp_path, "dead").exists()
        assert journal(tmp_path, "live").exists() and journal(tmp_path, "remote").exists()
        with pytest.raises(RuntimeError, match="still written"):
            store.publish(tags=["live"])
        assert store.publish(tags=["remote", "never-written"]) == 1
        assert not journal(tmp_path, "remote").exists()
    assert set(read_records(store.path)[0]) == {1, 2, 3, 4, 5, 50, 100}


def test_interrupt_leaves_the_journal_but_an_error_publishes(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    with pytest.raises(KeyboardInterrupt), store.writer("ctrl-c") as w:
        w.append(1, rec(1))
        raise KeyboardInterrupt
    assert journal(tmp_path, "ctrl-c").exists() and store.records() == {1: rec(1)}
    with pytest.raises(ZeroDivisionError), store.writer("crash") as w:
        w.append(2, rec(2))
        raise ZeroDivisionError
    assert not journal(tmp_path, "crash").exists()
    assert read_records(store.path)[0] == {2: rec(2)}
    assert store.publish() == 1  # this process no longer writes "ctrl-c"
    assert read_records(store.path)[0] == {2: rec(2), 1: rec(1)}


def test_a_recorded_mask_is_stored_once(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    other = CoalitionRecord(99.0, 1, 1.0)
    with store.writer("late") as late:
        with store.writer("early") as early:
            early.append(3, rec(3))
            early.append(3, other)  # no-op
            late.append(3, other)  # late opened before 3 was journaled: publishing dedupes
            assert len(journal(tmp_path, "early").read_bytes().splitlines()) == 2
        assert store.records()[3] == rec(3)  # the first published wins
    with store.writer("c") as c:
        c.append(3, other)  # no-op: published
        assert len(journal(tmp_path, "c").read_bytes().splitlines()) == 1
    assert read_records(store.path)[0] == {3: rec(3)}
    with h5py.File(store.path, "r") as f:
        assert f["mask"].shape[0] == 1


def test_corrupt_journal_line_is_reported(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    journal(tmp_path, "bad").write_text('{"journal": 1}\nnot json\n{"mask": "1"')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2"):
        store.records()


def _read_forever(root: Path, first_read, stop, out) -> None:
    try:
        store = CoalitionStore(root, N, IDENTITY)
        seen: set[int] = set()
        reads = 0
        while True:
            last = stop.is_set()
            now = store.records()
            assert seen <= now.keys(), f"records vanished: {sorted(seen - now.keys())}"
            assert all(r == rec(m) for m, r in now.items()), "a record changed or is corrupt"
            seen, reads = set(now), reads + 1
            first_read.set()
            if last:
                break
        out.put((reads, len(seen)))
    except BaseException as err:
        out.put(repr(err))


def test_reader_sees_growing_valid_data_while_a_writer_publishes(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    first_read, stop, out = CTX.Event(), CTX.Event(), CTX.Queue()
    reader = CTX.Process(target=_read_forever, args=(tmp_path, first_read, stop, out))
    reader.start()
    assert first_read.wait(timeout=20)
    for chunk in range(4):
        with store.writer(f"window-{chunk}") as w:
            for mask in range(chunk * 50, chunk * 50 + 50):
                w.append(mask, rec(mask))
    stop.set()
    result = out.get(timeout=20)
    reader.join(timeout=20)
    assert isinstance(result, tuple), result
    reads, last_seen = result
    assert last_seen == 200 and reads > 5
    assert len(read_records(store.path)[0]) == 200


def round_masks(who: int, rnd: int) -> list[int]:
    return [who * 1000 + rnd * 20 + i for i in range(20)] + [3000 + rnd]  # last one is shared


def _publish_in_step(root: Path, who: int, barrier) -> None:
    store = CoalitionStore(root, N, IDENTITY)
    for rnd in range(5):
        with store.writer(f"p{who}-r{rnd}") as w:
            for mask in round_masks(who, rnd):
                w.append(mask, rec(mask))
            barrier.wait(timeout=20)  # both leave the block, i.e. publish, together


def test_concurrent_publishers_lose_nothing(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    barrier = CTX.Barrier(2)
    procs = [CTX.Process(target=_publish_in_step, args=(tmp_path, who, barrier)) for who in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = {m for who in (0, 1) for rnd in range(5) for m in round_masks(who, rnd)}
    published = read_records(store.path)[0]
    assert set(published) == expected
    with h5py.File(store.path, "r") as f:
        assert f["mask"].shape[0] == len(expected) == 205
    assert not list((tmp_path / "journal").iterdir())


def _lock_owner(root: Path, **owner) -> Path:
    lock = root / ".lock"
    lock.mkdir()
    (lock / "owner.json").write_text(json.dumps({"start": 1, "token": "theirs", **owner}))
    return lock


def test_lock_of_an_exited_process_is_broken_with_a_warning(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    lock = _lock_owner(tmp_path, pid=int(gone.stdout), host=socket.gethostname(), time=time.time())
    with pytest.warns(UserWarning, match="stale lock .*has exited"):
        assert store.publish() == 0
    assert not lock.exists()


def test_old_lock_of_another_host_is_broken_and_a_fresh_one_times_out(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY, lock_timeout_s=0.3, stale_lock_s=60)
    lock = _lock_owner(tmp_path, pid=1, host="elsewhere", time=time.time() - 120)
    with pytest.warns(UserWarning, match="older than 60 s"):
        store.publish()
    assert not lock.exists()
    _lock_owner(tmp_path, pid=1, host="elsewhere", time=time.time())
    with pytest.raises(TimeoutError, match="elsewhere.*remove that directory"):
        store.publish()


def test_hdf5_file_locking_env_is_honoured(tmp_path, monkeypatch):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    with store.writer("w") as w:
        w.append(7, rec(7))
    hold = (
        "import h5py, sys; f = h5py.File(sys.argv[1], 'r+', locking=True); "
        "print('held', flush=True); sys.stdin.read()"
    )
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(store.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # an exclusive HDF5 lock on the file
        if "HDF5_USE_FILE_LOCKING" not in os.environ:  # HDF5 itself has not disabled locking
            monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "TRUE")
            with pytest.raises(OSError, match="lock"):
                store.records()
        monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
        assert CoalitionStore(tmp_path, N, IDENTITY).records() == {7: rec(7)}
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)


# --- claims: no coalition is evaluated twice by concurrent writers -------------------------


def _claim_and_evaluate(root: Path, tag: str, wanted: list[int], barrier, out) -> None:
    """A job: claim, evaluate what it claimed (slowly), then wait for or take over the rest."""
    store = CoalitionStore(root, N, IDENTITY)
    evaluated = []
    barrier.wait()
    with store.writer(tag, claim=wanted) as w:
        todo = w.claimed
        while True:
            for mask in todo:
                time.sleep(0.01)
                w.append(mask, rec(mask))
                evaluated.append(mask)
            todo = w.take_over(wanted, poll_s=0.02)
            if not todo:
                break
    out.put((tag, evaluated))


def test_overlapping_writers_evaluate_each_coalition_once(tmp_path):
    """Two estimators' jobs sharing a store (say SWSV and leave-one-out) run at the same time."""
    CoalitionStore(tmp_path, N, IDENTITY)
    wanted = {"swsv": list(range(0, 32)), "loo": [0] + [1 << i for i in range(N)]}
    barrier, out = CTX.Barrier(2), CTX.Queue()
    procs = [
        CTX.Process(target=_claim_and_evaluate, args=(tmp_path, tag, masks, barrier, out))
        for tag, masks in wanted.items()
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    evaluated = results["swsv"] + results["loo"]
    assert sorted(evaluated) == sorted(set(evaluated)), "a coalition was evaluated twice"
    assert set(evaluated) == set(wanted["swsv"]) | set(wanted["loo"])
    assert read_records(tmp_path / "coalitions.h5")[0] == {m: rec(m) for m in evaluated}


def _claim_then_die(root: Path, masks: list[int], claimed, done) -> None:
    store = CoalitionStore(root, N, IDENTITY)
    with store.writer("first", claim=masks) as w:
        claimed.set()
        for mask in w.claimed[:3]:
            w.append(mask, rec(mask))
        done.set()
        time.sleep(60)  # killed here, holding claims on the rest


def test_claims_of_a_killed_writer_are_taken_over(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    masks = list(range(1, 11))
    claimed, done = CTX.Event(), CTX.Event()
    child = CTX.Process(target=_claim_then_die, args=(tmp_path, masks, claimed, done))
    child.start()
    assert claimed.wait(20) and done.wait(20)
    with store.writer("second", claim=[*masks, 11, 12]) as w:
        assert w.claimed == [11, 12]  # the rest is claimed by a live writer
        for mask in w.claimed:
            w.append(mask, rec(mask))
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=20)
        orphans = w.take_over([*masks, 11, 12], poll_s=0.02)
        assert orphans == masks[3:]  # what the dead writer recorded stays done
        for mask in orphans:
            w.append(mask, rec(mask))
        assert w.take_over([*masks, 11, 12]) == []
    assert set(store.records()) == set(masks) | {11, 12}


def test_a_claim_from_another_host_lives_while_its_heartbeat_is_fresh(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY, stale_lock_s=60)
    header = {"journal": 1, "tag": "remote", "pid": 1, "host": "elsewhere", "start": 1}
    remote = journal(tmp_path, "remote")
    remote.write_text(json.dumps({**header, "claims": ["1", "2"]}) + "\n")
    with store.writer("here", claim=[1, 2, 3]) as w:
        assert w.claimed == [3]
        w.append(3, rec(3))
        old = time.time() - 120
        os.utime(remote, (old, old))  # the remote job stopped beating 2 minutes ago
        assert w.take_over([1, 2, 3], poll_s=0.02) == [1, 2]


def test_a_damaged_store_is_named_with_how_to_recover(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY)
    with store.writer("w") as w:
        w.append(7, rec(7))
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"coalitions.h5 is truncated or corrupt .*journals"):
        check_store(tmp_path)
    with pytest.raises(OSError, match=r"coalitions.h5 is truncated or corrupt .*journals"):
        CoalitionStore(tmp_path, N, IDENTITY)
    store.path.unlink()
    journal(tmp_path, "bad").write_text('{"journal": 1}\nnot json\n{"mask": "1"')
    with pytest.raises(OSError, match=r"bad.jsonl line 2.*move it aside"):
        check_store(tmp_path)


# --- one writer per journal: the same job run twice waits for, or takes over from, the first ---


def _hold_a_tag(root: Path, masks: list[int], second_waits, killed: bool) -> None:
    """The first run of a job: it claims everything, then records slowly once the second run of
    the same job (same tag) waits; killed, it records a third and dies holding the rest."""
    store = CoalitionStore(root, N, IDENTITY)
    with store.writer("window-000-003", claim=masks) as w:
        assert second_waits.wait(20)
        time.sleep(0.3)
        for mask in w.claimed[: 3 if killed else None]:
            w.append(mask, rec(mask))
        if killed:
            os.kill(os.getpid(), signal.SIGKILL)


def _second_run(root: Path, masks: list[int], second_waits, killed: bool):
    """Start the first run in a child, then enter the same job's writer here: (claimed, child)."""
    CoalitionStore(root, N, IDENTITY)
    child = CTX.Process(target=_hold_a_tag, args=(root, masks, second_waits, killed))
    child.start()
    _wait_until(lambda: journal(root, "window-000-003").exists(), "the first run's journal")
    store = CoalitionStore(root, N, IDENTITY)
    second_waits.set()
    with store.writer("window-000-003", claim=masks, poll_s=0.02) as w:
        claimed = list(w.claimed)
        for mask in claimed:
            w.append(mask, rec(mask))
    child.join(timeout=20)
    return claimed, child, store


def _wait_until(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_same_job_run_twice_waits_for_the_first(tmp_path):
    masks = list(range(1, 9))
    claimed, child, store = _second_run(tmp_path, masks, CTX.Event(), killed=False)
    assert child.exitcode == 0  # before: "written by running pid ...; give each job its own tag"
    assert claimed == [], "the second run evaluated what the first one did"
    assert read_records(store.path)[0] == {m: rec(m) for m in masks}


def test_the_same_job_takes_over_when_the_first_run_dies(tmp_path):
    masks = list(range(1, 9))
    claimed, child, store = _second_run(tmp_path, masks, CTX.Event(), killed=True)
    assert child.exitcode == -signal.SIGKILL
    assert claimed == masks[3:]  # the dead run's three records count, the rest is claimed
    assert read_records(store.path)[0] == {m: rec(m) for m in masks}


def test_a_journal_of_another_host_is_taken_over_once_its_heartbeat_is_stale(tmp_path):
    store = CoalitionStore(tmp_path, N, IDENTITY, stale_lock_s=1.0)
    header = {"journal": 1, "tag": "window-000-003", "pid": 1, "host": "elsewhere", "start": 1}
    record = {"mask": "1", "nll_sum": rec(1).nll_sum, "n_tokens": rec(1).n_tokens, "seconds": 0}
    remote = journal(tmp_path, "window-000-003")
    remote.write_text(json.dumps({**header, "claims": ["1", "2"]}) + "\n" + json.dumps(record))
    remote.write_text(remote.read_text() + "\n")
    start = time.monotonic()
    with store.writer("window-000-003", claim=[1, 2, 3], poll_s=0.02) as w:
        waited = time.monotonic() - start
        assert w.claimed == [2, 3]  # its record is kept; its claims died with it
    assert waited > 0.8, "a journal with a fresh heartbeat was taken over"
    assert set(read_records(store.path)[0]) == {1}


def _hold_then_mark(lock: Path, stale_s: float, holding, marker: Path, seconds: float) -> None:
    with held(lock, stale_s=stale_s, poll_s=0.02):
        holding.set()
        time.sleep(seconds)
        marker.write_text("done")


def test_a_held_job_runs_in_one_process_at_a_time(tmp_path):
    """The second run of a search waits while the first beats; the heartbeat keeps a lock older
    than its stale age alive."""
    lock, marker, holding = tmp_path / "s0.5.lock", tmp_path / "first-done", CTX.Event()
    child = CTX.Process(target=_hold_then_mark, args=(lock, 0.4, holding, marker, 1.2))
    child.start()
    assert holding.wait(20)
    with held(lock, stale_s=0.4, poll_s=0.02):
        assert marker.exists(), "entered while the first run held the lock"
    child.join(timeout=20)
    assert child.exitcode == 0 and not lock.exists()


def test_a_held_lock_of_a_killed_job_is_taken_over(tmp_path, caplog):
    lock, holding = tmp_path / "s0.5.lock", CTX.Event()
    child = CTX.Process(target=_hold_then_mark, args=(lock, 600, holding, tmp_path / "m", 60))
    child.start()
    assert holding.wait(20)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=20)
    with caplog.at_level(logging.INFO, logger="svnup"), held(lock, poll_s=0.02):
        pass
    assert "taking over" in caplog.text and "has exited" in caplog.text
    assert not lock.exists()


def _slow_summary(calls: Path, started, seconds: float):
    """A summary stage that takes ``seconds`` and notes each call's pid."""

    def summary(runs, out) -> None:
        with calls.open("a") as f:
            f.write(f"{os.getpid()}\n")
        started.set()
        time.sleep(seconds)
        Path(out).write_text(f"written by {os.getpid()}\n")

    return summary


def test_a_job_run_twice_at_once_runs_once_and_the_second_keeps_its_output(
    tmp_path, monkeypatch, caplog
):
    """Two processes running the job of one output (two --nolock workflow runs): the second waits
    for the first and keeps what it wrote."""
    from svnup import cli, stages

    calls, started = tmp_path / "calls", CTX.Event()
    monkeypatch.setattr(stages, "summary", _slow_summary(calls, started, 0.5))
    out = tmp_path / "summary.csv"
    argv = ["summary", "--runs", str(tmp_path / "ppl.json"), "--out", str(out)]
    first = CTX.Process(target=cli.main, args=(argv,))
    first.start()
    assert started.wait(20)
    with caplog.at_level(logging.INFO, logger="svnup"):
        assert cli.main(argv) == 0
    first.join(timeout=20)
    assert first.exitcode == 0
    assert calls.read_text().split() == [str(first.pid)]
    assert out.read_text() == f"written by {first.pid}\n"
    assert "while this one waited; keeping it" in caplog.text
    assert not (tmp_path / ".summary.csv.lock").exists()


def test_a_job_recomputes_an_output_it_did_not_see_another_job_write(tmp_path, monkeypatch):
    """An output that was there when the job started (Snakemake re-runs a job with update()
    outputs in place), or that changed under the job without the other job's record (Snakemake
    restoring a failed job's previous version), is computed again."""
    from svnup import cli, stages

    calls, started = tmp_path / "calls", CTX.Event()
    monkeypatch.setattr(stages, "summary", _slow_summary(calls, started, 0.0))
    out = tmp_path / "summary.csv"
    argv = ["summary", "--runs", str(tmp_path / "ppl.json"), "--out", str(out)]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # present before it started: a re-run
    assert calls.read_text().split() == [str(os.getpid())] * 2

    lock = tmp_path / ".summary.csv.lock"
    holding, released = CTX.Event(), CTX.Event()

    def hold_then_restore() -> None:
        with held(lock):
            holding.set()
            released.wait(20)
            restored = out.with_name("restored")
            restored.write_text("previous version\n")
            os.replace(restored, out)

    holder = CTX.Process(target=hold_then_restore)
    holder.start()
    assert holding.wait(20)
    threading.Timer(0.3, released.set).start()
    assert cli.main(argv) == 0
    holder.join(timeout=20)
    assert len(calls.read_text().split()) == 3
    assert out.read_text() == f"written by {os.getpid()}\n"
