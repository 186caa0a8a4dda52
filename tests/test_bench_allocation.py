"""The allocation benchmark keeps its default table for the config's whole grid."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_allocation.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_allocation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "data").mkdir()
    (tmp_path / "c4.jsonl").write_text("")
    monkeypatch.setattr(module, "SHARED", tmp_path)
    monkeypatch.setattr(module, "C4", tmp_path / "c4.jsonl")
    return module


@pytest.mark.parametrize(
    "narrowing",
    [
        ["--pruners", "wanda"],
        ["--sparsities", "0.4"],
        ["--allocations", "uniform"],
        ["--variants"],
        ["--evopress-generations", "250"],
        ["--only-run", "main"],
    ],
)
def test_a_narrowed_grid_needs_its_own_table(bench, narrowing, capsys):
    with pytest.raises(SystemExit):
        bench._parse(["--model", "smollm2-135m", *narrowing])
    assert f"{narrowing[0]} narrow the grid: pass --out" in capsys.readouterr().err
    args = bench._parse(["--model", "smollm2-135m", *narrowing, "--out", "t.md"])
    assert args.out == Path("t.md")


def test_the_whole_grid_writes_the_default_table(bench):
    args = bench._parse(["--model", "smollm2-135m"])
    assert args.out == SCRIPT.parent / "results" / "allocation-smollm2-135m.md"
    args = bench._parse(["--model", "smollm2-135m", "--windows", "0"])
    assert args.out.name == "allocation-smollm2-135m-all-windows.md"
