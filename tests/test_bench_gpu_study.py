"""The full-length GPU study script: each cell is pruned from the dense weights with its recorded
allocation and evaluated as a freshly loaded model would be, whatever ran before it in the same
worker; the report's table and margins come from those numbers. Runs on the CPU at a tiny size."""

import importlib.util
import json
from pathlib import Path

import pytest
from workflow_fixture import build_project

from svnup import stages
from svnup.calibration import load_statistics
from svnup.models import load_model
from svnup.perplexity import dataset_perplexity
from svnup.pruning import prune_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_study.py"
SEQLEN = 48


def _script():
    spec = importlib.util.spec_from_file_location("bench_gpu_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = build_project(tmp_path_factory.mktemp("gpu-study"), n_layers=3)
    model = {"path": str(root / "tiny"), "dtype": "float32"}
    calibration = root / "calibration.h5"
    stages.calibrate(
        {"model": model, "seqlen": SEQLEN, "dataset": str(root / "data" / "train.jsonl"),
         "nsamples": 4, "seed": 0},
        {"device": "cpu", "batch_size": 4, "offload": "auto"},
        calibration,
    )  # fmt: skip
    cells = [
        {"id": "dense", "row": "dense", "pruner": None, "sparsity": 0.0, "sparsities": None},
        {"id": "u/wanda", "row": "uniform", "pruner": "wanda", "sparsity": 0.5,
         "sparsities": [0.5, 0.5, 0.5], "cpu": {"windows": 2, "ppl": 1.0}},
        {"id": "u/sparsegpt", "row": "uniform", "pruner": "sparsegpt", "sparsity": 0.5,
         "sparsities": [0.5, 0.5, 0.5]},
        {"id": "fit/sparsegpt", "row": "SV-NUP-fit (SparseGPT probe)", "pruner": "sparsegpt",
         "sparsity": 0.5, "sparsities": [0.3, 0.7, 0.5]},
    ]  # fmt: skip
    (root / "cells.json").write_text(json.dumps(cells))
    args = [
        *("--cells", str(root / "cells.json"), "--model-dir", model["path"]),
        *("--calibration", str(calibration), "--dataset", str(root / "data" / "heldout.jsonl")),
        *("--device", "cpu", "--threads", "1", "--batch-size", "4", "--seqlen", str(SEQLEN)),
        *("--short-windows", "2", "--work-dir", str(root / "work")),
    ]
    bench = _script()
    # one worker, so every pruned cell after the first starts from weights another cell changed
    assert bench.main(["run", *args, "--workers", "1", "--out", str(root / "study.json")]) == 0
    return {"root": root, "bench": bench, "args": args, "calibration": calibration}


def _fresh_ppl(root: Path, calibration: Path, sparsities, pruner, windows=None) -> float:
    engine, tokenizer = load_model(root / "tiny", batch_size=4)
    if sparsities is not None:
        prune_model(engine, load_statistics(calibration)[0], sparsities, method=pruner)
    data = str(root / "data" / "heldout.jsonl")
    return dataset_perplexity(engine, tokenizer, data, seqlen=SEQLEN, windows=windows).ppl


def test_each_cell_matches_a_freshly_loaded_and_pruned_model(study):
    results = json.loads((study["root"] / "study.json").read_text())
    cells = {c["id"]: c for c in results["cells"]}
    assert len(cells) == 4
    for cell in cells.values():
        (short, full) = sorted(cell["ppl"], key=int)
        assert int(short) == 2 and int(full) > 2
        fresh = _fresh_ppl(study["root"], study["calibration"], cell["sparsities"], cell["pruner"])
        assert cell["ppl"][full] == pytest.approx(fresh, rel=1e-5), cell["id"]
    first = _fresh_ppl(study["root"], study["calibration"], [0.3, 0.7, 0.5], "sparsegpt", 2)
    assert cells["fit/sparsegpt"]["ppl"]["2"] == pytest.approx(first, rel=1e-5)
    # the allocation matters at this size, so equal numbers would mean a cell was not pruned
    assert cells["fit/sparsegpt"]["ppl"][full] != cells["u/sparsegpt"]["ppl"][full]


def test_a_finished_cell_is_not_run_again(study):
    root = study["root"]
    before = json.loads((root / "study.json").read_text())["cells"]
    marker = root / "work" / "u__wanda.json"
    stamp = marker.stat().st_mtime_ns
    out = root / "again.json"
    assert study["bench"].main(["run", *study["args"], "--workers", "2", "--out", str(out)]) == 0
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["cells"] == before


def test_report_marks_the_best_cell_and_the_margin(study):
    results = json.loads((study["root"] / "study.json").read_text())
    text = study["bench"].report(results)
    cells = {c["id"]: c for c in results["cells"]}
    full = max(cells["dense"]["ppl"], key=int)
    uniform, fit = cells["u/sparsegpt"]["ppl"][full], cells["fit/sparsegpt"]["ppl"][full]
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    best = min(uniform, fit)
    assert f"**{best:.2f}**" in (rows["| uniform"] + rows["| SV-NUP-fit (SparseGPT probe)"])
    assert (
        f"{fit / uniform - 1:+.1%} vs uniform"
        in rows["| SV-NUP-fit (SparseGPT probe) vs best no-game"]
    )
    assert f"dense perplexity {cells['dense']['ppl'][full]:.2f}" in text
    # the one cell with a CPU number at an evaluated window count is compared with it
    gap = cells["u/wanda"]["ppl"]["2"] / 1.0 - 1
    assert f"| wanda | 50% | 1 | {abs(gap):.2%} | {gap:+.2%} (uniform) |" in text
    assert "| sparsegpt |" not in text.split("## The GPU against the CPU study")[1]


def test_cells_come_from_the_study_cache_dense_first_then_50_and_60_percent(tmp_path):
    bench = _script()

    def study_cell(folder, allocation, sparsity, pruner, sparsities, windows, ppl):
        path = tmp_path / folder / "results" / bench.MODEL / f"s{sparsity}" / allocation / pruner
        path.mkdir(parents=True)
        evaluation = {"windows": windows, "ppl": ppl}
        record = {"budget": {"sparsities": sparsities}, "evaluations": {"test": evaluation}}
        (path / "ppl.json").write_text(json.dumps(record))

    study_cell("allocation", "uniform", 0.4, "wanda", [0.4, 0.4], 64, 43.0)
    study_cell("allocation", "atp", 0.5, "sparsegpt", [0.45, 0.55], 595, 65.0)
    study_cell("allocation-svnup-swsv", "svnup", 0.6, "wanda", [0.5, 0.7], 64, 118.0)
    cells = bench.collect_cells(tmp_path)
    assert [c["id"] for c in cells] == [
        "dense",
        "allocation/atp/s0.5/sparsegpt",
        "allocation-svnup-swsv/svnup/s0.6/wanda",
        "allocation/uniform/s0.4/wanda",
    ]
    assert [c["row"] for c in cells[1:]] == ["ATP", "SV-NUP (SWSV)", "uniform"]
    assert cells[1]["sparsities"] == [0.45, 0.55]
    assert cells[1]["cpu"] == {"windows": 595, "ppl": 65.0}
    assert cells[0]["sparsities"] is None
