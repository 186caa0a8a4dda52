"""Atomic outputs, strict JSON, and one GPU per concurrent job."""

import json
import subprocess
import sys

import pytest

from svnup.gpus import claim_gpu
from svnup.io import CorruptFileError, JsonLines, atomic_path, read_json, write_json


def test_overflowing_numbers_are_written_as_null(tmp_path):
    write_json(tmp_path / "ppl.json", {"ppl": float("inf"), "runs": [float("nan"), 2.5]})
    assert json.loads((tmp_path / "ppl.json").read_text()) == {"ppl": None, "runs": [None, 2.5]}


def test_unreadable_json_and_journals_name_the_file_and_line(tmp_path):
    latin = tmp_path / "scores.json"
    latin.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(CorruptFileError, match=r"scores.json is truncated or corrupt \(not UTF-8"):
        read_json(latin)
    journal = JsonLines(tmp_path / "s0.5.journal")
    journal.append({"beta": 0.1, "nll": 2.0})
    with journal.path.open("ab") as f:
        f.write(b'{"beta": 0.2, "nll"\n{"beta": 0.3, "nll": 1.0}\n{"torn": ')
    with pytest.raises(CorruptFileError, match=r"journal .*line 2 column 20 is not valid JSON"):
        journal.rows()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_failed_write_leaves_no_output(tmp_path, kind):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        if kind == "file":
            tmp.write_text("half")
        else:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_directory_output_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"
    for text in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(text)
    assert (target / "weights").read_text() == "new"


HOLD = """
import os, sys, time
from svnup.gpus import claim_gpu
print(claim_gpu({"device": "cuda"}), os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_concurrent_gpu_jobs_claim_distinct_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("SVNUP_GPUS", "2")
    monkeypatch.setenv("SVNUP_GPU_LOCKS", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    held = []
    try:
        for index in ("0", "1"):
            job = subprocess.Popen(
                [sys.executable, "-c", HOLD, "30"], stdout=subprocess.PIPE, text=True
            )
            held.append(job)
            assert job.stdout.readline().split() == [index, index]
        third = subprocess.run([sys.executable, "-c", HOLD, "0"], capture_output=True, text=True)
        assert third.returncode != 0 and "all 2 GPUs are claimed" in third.stderr
    finally:
        for job in held:
            job.kill()
            job.wait()
    again = subprocess.run([sys.executable, "-c", HOLD, "0"], capture_output=True, text=True)
    assert again.stdout.split() == ["0", "0"], "a finished job's GPU is free again"


def test_no_claim_when_the_scheduler_chose_or_on_cpu(monkeypatch):
    monkeypatch.setenv("SVNUP_GPUS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert claim_gpu({"device": "cuda"}) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert claim_gpu({"device": "cpu"}) is None
    assert claim_gpu({"device": "cuda:1"}) is None


def test_cuda_problem_is_told_without_torch_where_no_driver_is(tmp_path, monkeypatch):
    import svnup.gpus

    monkeypatch.setattr(svnup.gpus, "DRIVER_NODES", (str(tmp_path / "nvidiactl"),))
    assert svnup.gpus.cuda_problem("cuda") == (
        f"this machine has no GPU driver (none of {tmp_path / 'nvidiactl'})"
    )
    torch = pytest.importorskip("torch")
    (tmp_path / "nvidiactl").touch()  # a driver node, so torch is asked
    if torch.cuda.is_available():
        assert svnup.gpus.cuda_problem("cuda") is None
        count = torch.cuda.device_count()
        assert f"cuda:{count} names GPU {count}" in svnup.gpus.cuda_problem(f"cuda:{count}")
    else:
        assert "finds no usable CUDA device" in svnup.gpus.cuda_problem("cuda")
