"""The quick start benchmark's report: the perplexity table, the recommended allocation's margins
and the time per stage come from the files of the run it timed."""

import importlib.util
import shutil
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quickstart.py"
TSV_HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _script():
    spec = importlib.util.spec_from_file_location("bench_quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark(path: Path, wall: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{TSV_HEAD}{wall}\t0:00:01\t1\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_report_tabulates_the_timed_run(tmp_path):
    bench = _script()
    results = tmp_path / "results"
    ppl = {"dense": 30.0, "uniform": 80.0, "owl": 79.0, "atp": 76.0, "svnup-fit": 72.0}
    rows = ["path,allocation,pruner,sparsity,dataset,ppl,zero_shot_acc,pruning_seconds"]
    rows += [f"p,{a},wanda,0.5,wikitext,{v},," for a, v in ppl.items()]
    (results / bench.MODEL).mkdir(parents=True)
    (results / bench.MODEL / "summary.csv").write_text("\n".join(rows) + "\n")
    marks = results / bench.MODEL / "benchmarks"
    _benchmark(marks / "prune" / "uniform" / "s0.5" / "wanda" / "a.tsv", 40, 30)
    _benchmark(marks / "prune" / "owl" / "s0.5" / "wanda" / "b.tsv", 50, 35)
    _benchmark(marks / "calibrate" / "c.tsv", 20, 15)
    _benchmark(results / "gguf" / "benchmarks" / "d.tsv", 60, 45)
    assert bench.stage_seconds(tmp_path) == {
        "calibrate": (1, 20.0, 15.0),
        "convert_gguf": (1, 60.0, 45.0),
        "prune": (2, 90.0, 65.0),
    }
    shutil.copy(bench.REPO / "config.yaml", tmp_path / "config.yaml")
    text = bench.report(tmp_path, wall=600.0, cpu=180.0, loads=[2.0, 4.0])
    entry = yaml.safe_load((bench.REPO / "config.yaml").read_text())["models"][bench.MODEL]
    assert entry["allocation"]["method"] == "svnup-fit"
    assert set(entry["targets"]["allocations"]) == {"uniform", "owl", "atp", "svnup-fit"}
    assert "| uniform | 80.00 | -10.0% |" in text and "| ATP | 76.00 | -5.3% |" in text
    assert "| SV-NUP-fit (halves) | 72.00 |  |" in text
    assert "is ahead of uniform, OWL, ATP" in text
    assert "**wall time: 10.0 min**; CPU time of the command (snakemake and its jobs): 3.0" in text
    assert "of which the jobs' own 2.1 min" in text
    assert "mean 3.0, min 2.0, max 4.0" in text
    assert "| prune | 2 | 90 | 65 |" in text


def test_the_project_reads_the_local_copies_of_the_hub_datasets(tmp_path):
    bench = _script()
    project = bench.fresh_project(tmp_path / "work", tmp_path / "shared")
    entry = yaml.safe_load((project / "config.yaml").read_text())["models"][bench.MODEL]
    wikitext = str((tmp_path / "shared/data/wikitext-2-raw-v1").resolve())
    assert entry["calibration"]["dataset"] == str(
        (tmp_path / "shared/data/c4/c4-validation-2k.jsonl").resolve()
    )
    assert entry["calibration"]["protocol"] == "c4"
    assert entry["evaluation"]["datasets"] == [wikitext]
    assert entry["evaluation"]["protocols"] == {wikitext: "wikitext2"}
