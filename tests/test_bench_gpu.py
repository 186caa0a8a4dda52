"""The GPU benchmark script runs end to end (on the CPU, at a tiny shape), so it works the day a
session is lent a GPU."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_coalitions.py"


def test_gpu_benchmark_runs_at_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu_coalitions", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    args = ["--shape", "tiny", "--sequences", "2", "--seqlen", "32", "--device", "cpu"]
    assert bench.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    row = json.loads(text.split("```json\n")[1].split("\n```")[0])
    # 8 blocks, the window in the middle (blocks 2-5). The trie: 2 shared dense blocks,
    # 2 + 4 + 8 + 16 inside the window, then blocks 6-7 for each of the 16 coalitions.
    assert row["coalitions"] == 16
    assert row["block_forwards"] == 2 + 30 + 16 * 2
    assert row["naive_block_forwards"] == 16 * 8
    assert row["tokens_per_second"] > 0 and row["seconds_per_coalition"] > 0


def _script(name: str):
    import sys

    sys.path.insert(0, str(SCRIPT.parent))  # the scripts import their neighbours
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_wheels_build_source_only_packages_and_leave_out_what_the_gpu_image_has(
    tmp_path, monkeypatch
):
    wheels = _script("device_wheels")
    calls = []

    def pip(*args):  # pip's downloads and builds, as the files they leave
        calls.append(args)
        folder = Path(args[args.index("-d") + 1]) if "-d" in args else None
        if args[0] == "download" and "--only-binary=:all:" not in args:
            folder.mkdir(parents=True)
            (folder / "connection_pool-0.0.3.tar.gz").write_text("")
            (folder / "PyYAML-6.0.4-cp311-cp311-manylinux2014_x86_64.whl").write_text("")
        elif args[0] == "download":
            for name in (
                "snakemake-9.27.1-py3-none-any.whl",
                "snakemake_interface_common-1.23.0-py3-none-any.whl",
                "connection_pool-0.0.3-py3-none-any.whl",
                "PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl",
                "typing_extensions-4.16.0-py3-none-any.whl",
                "pulp-3.3.2-py3-none-any.whl",
            ):
                (folder / name).write_text("")

    monkeypatch.setattr(wheels, "_pip", pip)
    kept = wheels.download(tmp_path / "whl")
    assert [w.name.split("-")[0] for w in kept] == [
        "connection_pool",
        "snakemake",
        "snakemake_interface_common",
    ]
    built = [c for c in calls if c[0] == "wheel"]
    assert len(built) == 1 and built[0][-1].endswith("connection_pool-0.0.3.tar.gz")
    binary = next(c for c in calls if "--only-binary=:all:" in c)
    assert binary[binary.index("--python-version") + 1] == "3.12"
    assert any(c.startswith("snakemake==") for c in binary)


def test_gpu_evopress_runs_the_reference_search_beside_the_recommendation(tmp_path):
    import yaml

    from svnup import config as cfg

    script = _script("bench_gpu_evopress")
    args = script._parse(["run", "--inputs", "x", "--work", "w", "--out", str(tmp_path)])
    settings = cfg.model_settings(script.study_config(args), "smollm2-135m")
    reference = yaml.safe_load((SCRIPT.parents[1] / "config.yaml").read_text())
    evopress = settings["allocation"]["evopress"]
    assert evopress == reference["allocation"]["evopress"]
    assert (evopress["generations"], evopress["offspring"]) == (400, 64)
    assert evopress["tokens"] == [2048, 16384, 65536] and evopress["survivors"] == [8, 2, 1]
    # the last selection step's 65,536 tokens fit the calibration set
    assert settings["calibration"]["nsamples"] * settings["seqlen"] >= max(evopress["tokens"])
    assert (settings["shapley"]["players"], settings["shapley"]["probe_pruner"]) == (
        "halves",
        "match",
    )
    assert settings["device"] == "cuda" and settings["evaluation"]["windows"] is None


def test_gpu_evopress_inputs_travel_in_two_calls_and_join_to_the_checked_gguf(
    tmp_path, monkeypatch
):
    script = _script("bench_gpu_evopress")
    monkeypatch.chdir(tmp_path)  # the digests' memo is a workflow path (results/gguf/)
    shared = tmp_path / "shared"
    gguf = shared / "model.gguf"
    test = shared / script.TEST
    test.parent.mkdir(parents=True)
    gguf.write_bytes(bytes(range(100)))
    test.write_text('{"text": "a"}\n')
    c4 = shared / "c4.jsonl"
    c4.write_text("".join(f'{{"text": "{i}"}}\n' for i in range(5)))
    for name, value in [("SMOLLM_GGUF", gguf), ("C4", c4), ("SHARED", shared)]:
        monkeypatch.setattr(script.bench_allocation, name, value)
    monkeypatch.setattr(script.bench_allocation, "CALIBRATION_DOCS", 3)
    monkeypatch.setattr(script, "FIRST_PART", 40)
    monkeypatch.setattr(script.device_wheels, "download", lambda out: out.mkdir())
    script.prepare(tmp_path / "dev")
    first, second = tmp_path / "dev" / "call1", tmp_path / "dev" / "call2"
    assert (first / f"{script.GGUF}.part1").stat().st_size == 40
    work = tmp_path / "work"
    script.assemble([first, second], work)
    assert (work / "models" / script.GGUF).read_bytes() == bytes(range(100))
    assert len((work / script.CALIBRATION).read_text().splitlines()) == 3
    assert (work / script.TEST).read_text() == '{"text": "a"}\n'
    (second / f"{script.GGUF}.part2").write_bytes(b"\0" * 60)  # a damaged transfer
    (work / "models" / script.GGUF).unlink()
    with pytest.raises(SystemExit, match="checksum"):
        script.assemble([first, second], work)
    monkeypatch.setattr(script, "CARRY_LIMIT", 10)
    with pytest.raises(SystemExit, match="64 MiB"):
        script.prepare(tmp_path / "dev")


def test_gpu_evopress_reports_a_search_stopped_at_the_deadline_from_its_journal(tmp_path):
    script = _script("bench_gpu_evopress")
    folder = tmp_path / "work" / f"results/{script.MODEL}/search/evopress/k"
    folder.mkdir(parents=True)
    rows = [
        {"generation": g, "parent": [0], "fitness": 1.0 / (g + 1), "seconds": 2.0} for g in (0, 1)
    ]
    (folder / "s0.5.journal").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    out.mkdir()
    (found,) = script.searches(tmp_path / "work", out)
    assert (found["target"], found["finished"], len(found["history"])) == ("0.5", False, 2)
    assert (out / "search-k-s0.5.journal").exists()  # comes back for a later call to resume
    args = script._parse(["run", "--inputs", "x", "--work", "w", "--out", str(out)])
    args.pruners = ["wanda"]
    cells = script.cells(tmp_path / "work", [0.5], ["wanda"])
    text = script.report(args, script.study_config(args), 9.0, True, cells, [found], {})
    assert "| s0.5 (stopped) | 2 | 2.00 | 1 |" in text
    assert "| 50% | wanda | - | - | - |" in text


def test_a_workflow_past_its_deadline_is_stopped_with_its_children_and_reported(tmp_path):
    import sys

    script = _script("bench_gpu_scale")
    log = tmp_path / "log"
    assert script.run_until([sys.executable, "-c", "print('done')"], tmp_path, {}, log, 30) == (
        0,
        False,
    )
    assert log.read_text() == "done\n"
    child = tmp_path / "child.pid"
    sleeper = (
        "import os, subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    returncode, stopped = script.run_until([sys.executable, "-c", sleeper], tmp_path, {}, log, 2)
    assert stopped and returncode != 0
    pid = int(child.read_text())
    for _ in range(50):  # the job the workflow started goes with it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the workflow's child outlived the deadline")
