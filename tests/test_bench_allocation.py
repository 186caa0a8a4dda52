"""The allocation benchmark keeps its default table for the config's whole grid."""

import importlib.util
import os
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


class _Stop(Exception):
    pass


@pytest.fixture
def recorded(bench, tmp_path, monkeypatch):
    """The folders ``main`` prepares and runs, with the workflow and the GGUF conversion stubbed
    out and the table's collection stopped before it reads anything."""
    calls = []
    monkeypatch.setattr(bench, "prepare", lambda folder, *args: calls.append(("prepare", folder)))
    monkeypatch.setattr(bench, "share_dense", lambda *args: None)
    monkeypatch.setattr(
        bench, "run_snakemake", lambda folder, *args: calls.append(("run", folder)) or 1.0
    )

    def collect(args, config, folders):
        calls.append(("collect", folders))
        raise _Stop

    monkeypatch.setattr(bench, "collect", collect)
    return calls


def _argv(tmp_path, *extra):
    return [
        "--model", "smollm2-135m", "--pruners", "wanda", "--sparsities", "0.6",
        "--allocations", "uniform", "--workdir", str(tmp_path / "study"),
        "--out", str(tmp_path / "t.md"), *extra,
    ]  # fmt: skip


def _finish(folder, cells):
    for cell in cells:
        path = folder / "results" / "smollm2-135m" / cell / "ppl.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


def test_a_folder_only_read_must_hold_its_runs_before_anything_runs(bench, recorded, tmp_path):
    argv = _argv(tmp_path, "--variants", "evopress-match", "--only-run", "evopress-match")
    with pytest.raises(SystemExit, match="--only-run leaves main to be read, but .*s0.6/uniform"):
        bench.main(argv)
    assert recorded == []  # nothing prepared (no GGUF conversion), nothing run
    _finish(tmp_path / "study", ["s0.6/uniform/wanda"])
    with pytest.raises(SystemExit, match=r"s0.6/uniform/sparsegpt/ppl.json is missing \(1 of"):
        bench.main(argv)  # the cost reference is read from main too
    _finish(tmp_path / "study", ["s0.6/uniform/sparsegpt"])
    with pytest.raises(_Stop):
        bench.main(argv)
    variant = tmp_path / "study-evopress-match"
    assert recorded[:2] == [("prepare", variant), ("run", variant)]
    assert set(recorded[2][1]) == {"uniform", "evopress-match"}
    assert recorded[2][1]["uniform"][0] == tmp_path / "study"


def test_a_variant_only_read_is_checked_too(bench, recorded, tmp_path):
    argv = _argv(tmp_path, "--variants", "svnup-types", "--only-run", "main")
    with pytest.raises(SystemExit, match="leaves svnup-types to be read.*add svnup-types"):
        bench.main(argv)
    assert recorded == []
    _finish(tmp_path / "study-svnup-types", ["s0.6/svnup-types/wanda"])
    with pytest.raises(_Stop):
        bench.main(argv)
    assert recorded[:2] == [("prepare", tmp_path / "study"), ("run", tmp_path / "study")]


def test_only_run_names_a_folder_of_the_study(bench, recorded, tmp_path):
    with pytest.raises(SystemExit, match="--only-run evopress-match: not main or one of"):
        bench.main(_argv(tmp_path, "--variants", "--only-run", "main", "evopress-match"))
    assert recorded == []


def test_a_variant_folder_takes_the_main_folders_checkpoint_and_its_keys(bench, tmp_path):
    """Each folder converting the GGUF itself gave the dense model a key per folder (a large
    weights file is fingerprinted by size and mtime), so its evaluations were not shared."""
    from svnup.content import HASH_LIMIT, fingerprint

    bench.C4.write_text('{"text": "a"}\n' * bench.CALIBRATION_DOCS)
    main = tmp_path / "main" / "models" / "smollm2-135m"
    main.mkdir(parents=True)
    (main / "config.json").write_text("{}")
    with open(main / "model.safetensors", "wb") as weights:
        weights.truncate(HASH_LIMIT + 1)  # fingerprinted by size and mtime
    os.utime(main / "model.safetensors", ns=(0, 10**18))
    bench.prepare(tmp_path / "variant", "smollm2-135m", tmp_path / "main")
    copy = tmp_path / "variant" / "models" / "smollm2-135m"
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in copy.parent.iterdir()) == ["smollm2-135m"]  # no partial copy
    assert fingerprint(copy) == fingerprint(main)
    assert (tmp_path / "variant" / "calib" / f"c4-first-{bench.CALIBRATION_DOCS}.jsonl").is_file()


def test_a_seeded_search_folder_also_evaluates_its_seed(bench, recorded, tmp_path, monkeypatch):
    """The seed's games are played in the seeded search's folder anyway: its allocation is
    evaluated there and tabulated under its own label, unless that variant has a folder."""
    configs = {}

    def run(folder, settings, *args):
        configs[folder.name] = settings
        return 1.0

    monkeypatch.setattr(bench, "run_snakemake", run)
    argv = _argv(tmp_path, "--variants", "evopress-seeded-types")
    with pytest.raises(_Stop):
        bench.main(argv)
    seeded = configs["study-evopress-seeded-types"]
    assert seeded["targets"]["allocations"] == ["evopress", "svnup-fit"]
    assert seeded["allocation"]["svnup-fit"]["split"] == "types"
    assert seeded["allocation"]["evopress"]["start"] == "svnup-fit"
    folders = recorded[-1][1]
    assert set(folders) == {"uniform", "evopress-seeded-types", "svnup-fit-halves-types"}
    assert folders["svnup-fit-halves-types"][0] == tmp_path / "study-evopress-seeded-types"

    recorded.clear()
    with pytest.raises(_Stop):
        bench.main(_argv(tmp_path, "--variants", "evopress-seeded-types", "svnup-fit-halves-types"))
    assert configs["study-evopress-seeded-types"]["targets"]["allocations"] == ["evopress"]
    folders = recorded[-1][1]
    assert folders["svnup-fit-halves-types"][0] == tmp_path / "study-svnup-fit-halves-types"


def test_a_table_writes_its_cells_budgets_beside_it(bench, recorded, tmp_path, monkeypatch):
    """A searched allocation outlives its folder: the table's budgets file holds every cell's."""
    import json

    budget = {"ppl": 98.6, "sparsities": [0.6], "layer_sparsities": [{"mlp.up_proj": 0.6}]}
    monkeypatch.setattr(
        bench, "collect", lambda *args: {"budgets": {"evopress/wanda/s0.6": budget}}
    )
    monkeypatch.setattr(bench, "report", lambda *args: ["# table"])
    _finish(tmp_path / "study", ["s0.6/uniform/sparsegpt"])
    (tmp_path / "study/results/smollm2-135m/s0.6/uniform/sparsegpt/ppl.json").write_text(
        '{"pruning": {"seconds": 1.0}}'
    )
    bench.main(_argv(tmp_path, "--variants"))
    assert (tmp_path / "t.md").read_text() == "# table\n"
    assert json.loads((tmp_path / "t.budgets.json").read_text()) == {"evopress/wanda/s0.6": budget}


def test_a_cells_budget_is_the_file_the_prune_stage_reads(bench, tmp_path):
    """The run's JSON keeps only part of its budget; the budgets file keeps the whole budget
    file, which ``svnup prune --budget`` accepts as it is."""
    import json

    from svnup.config import key
    from svnup.provenance import check_budget

    spec = {"calibration": "61a827a69432", "max": 0.99, "method": "uniform", "min": 0.0}
    budget = {
        "spec": spec, "target": 0.6, "achieved": 0.6, "sparsities": [0.6, 0.6],
        "block_params": [10, 10], "importance": None,
        "scores": {"source": None, "n_coalitions": None, "seconds": None},
    }  # fmt: skip
    path = tmp_path / f"results/smollm2-135m/budget/uniform/{key(spec)}/s0.6.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(budget))
    run = {"target_sparsity": 0.6, "budget": {k: budget[k] for k in ("spec", "sparsities")}}
    found = bench.run_budget(tmp_path, "smollm2-135m", "uniform", run)
    assert found == budget
    check_budget(found, path, target=0.6, spec_key=key(spec))
