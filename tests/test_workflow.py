"""The real snakemake on a tiny project: end to end, then what each config change re-plans, and
how bad input, damaged files and killed runs are handled.

The tests run in order on one project (module scope): each changes the config, asserts on what a
dry run plans, and where needed runs the change so the next test starts from a finished state.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import chdir
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import LLAMA_LAYERS
from workflow_fixture import (
    REPO,
    SNAKEFILE,
    build_project,
    planned_jobs,
    snakemake,
    snakemake_command,
    tiny_config,
    write_config,
)

from svnup import config as cfg
from svnup import zeroshot
from svnup.registry import ALLOCATIONS, PRUNERS
from svnup.store import read_records

pytestmark = pytest.mark.workflow

MODEL_STAGES = {"calibrate", "probe", "coalitions", "shapley", "metric", "levels", "search"}
# EvoPress at the size of the tiny project (8 calibration sequences of 48 tokens), on a Wanda
# database (no Hessian pass)
EVOPRESS = {
    "probe_pruner": "wanda",
    "generations": 2,
    "offspring": 4,
    "survivors": [2, 1],
    "tokens": [96, 192],
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = build_project(tmp_path_factory.mktemp("workflow"))
    first = snakemake(root, "--cores", "2")
    (root / "first-run.txt").write_text(first.stdout + first.stderr)
    return root


def _ppl(root: Path, target: str) -> dict:
    return json.loads((root / target).read_text())


def test_end_to_end_outputs(project):
    run = _ppl(project, "results/tiny/s0.5/ppl.json")
    assert run["allocation"] == "svnup" and run["pruner"] == "wanda"
    ((dataset, ppl),) = run["perplexity"].items()
    assert dataset == "data/heldout.jsonl" and math.isfinite(ppl) and ppl > 1
    evaluation = run["evaluations"][dataset]
    assert evaluation["windows"] > 0 and evaluation["seqlen"] == 48
    assert run["budget"]["achieved"] == pytest.approx(0.5, abs=1e-9)
    assert len(run["budget"]["sparsities"]) == 6
    assert run["pruning"]["block_sparsity"] == pytest.approx(run["budget"]["sparsities"], abs=0.02)
    assert run == _ppl(project, "results/tiny/s0.5/svnup/wanda/ppl.json")
    summary = (project / "results/tiny/summary.csv").read_text()
    assert "dense" in summary and "uniform" in summary
    for figure in ("shapley.png", "sparsity.png", "perplexity.png", "report.html"):
        assert (project / "results/tiny/report" / figure).stat().st_size > 1000
    shapley = (next((project / "results/tiny/shapley/swsv").glob("*/shapley.csv"))).read_text()
    assert shapley.splitlines()[0] == "block,shapley,stderr" and len(shapley.splitlines()) == 7
    assert planned_jobs(project) == {}


def test_default_console_is_quiet(project):
    """Rule names and a progress line per job, the progress bars of long steps; no commands."""
    output = (project / "first-run.txt").read_text()
    assert "python -m svnup" not in output, "shell commands belong to --printshellcmds"
    assert "localrule" not in output and "wildcards:" not in output
    jobs = output.count("Finished jobid")
    assert jobs == sum(_job_counts(output).values()) and "(Rule: coalitions)" in output
    assert "coalitions: 100%" in output and "dense statistics: 100%" in output
    lines = [line for line in output.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) <= 6 * jobs + 25, "\n".join(lines)  # 410 lines with shell commands


@pytest.mark.slow
def test_every_registered_allocation_method_runs(project):
    """The registry, the schema, the wildcards and the rules agree: every method runs, and a
    method that searches with the run's pruner gets one search and one budget per pruner."""
    overrides = {
        "allocation.atp": {"step": 0.05},
        "allocation.svnup-fit": {"levels": [0.3, 0.5]},
        "allocation.evopress": EVOPRESS,
    }
    write_config(project, tiny_config(**overrides))
    targets = {method: f"results/tiny/s0.5/{method}/wanda/ppl.json" for method in ALLOCATIONS}
    targets["atp-magnitude"] = "results/tiny/s0.5/atp/magnitude/ppl.json"
    try:
        snakemake(project, "--cores", "2", *targets.values())
        for name, target in targets.items():
            budget = _ppl(project, target)["budget"]
            assert budget["achieved"] == pytest.approx(0.5, abs=1e-9), name
            spread = max(budget["sparsities"]) - min(budget["sparsities"])
            assert (spread == 0) == (name == "uniform"), (name, budget["sparsities"])
        searches = list((project / "results/tiny/search/atp").glob("*/s0.5.json"))
        assert len(searches) == 2
        for path in searches:
            search = json.loads(path.read_text())
            betas = [c["beta"] for c in search["candidates"]]
            assert betas == pytest.approx([0.05, 0.1, 0.15, 0.2])
            best = min(search["candidates"], key=lambda c: c["nll"])
            assert search["beta"] == best["beta"]
    finally:
        write_config(project, tiny_config())


def test_snakemake_report_renders_registered_figures(project):
    snakemake(project, "--report", "report.html")
    page = (project / "report.html").read_text()
    for name in ("shapley.png", "sparsity.png", "perplexity.png", "summary.csv"):
        assert name in page


def test_report_marks_the_configured_method_and_prints_the_models_note(project):
    """The plots rule tells the report the model's allocation.method and its note; changing
    either re-runs the report, not a single pruning job."""
    page = (project / "results/tiny/report/report.html").read_text()
    assert "<b>50% Wanda, heldout.jsonl</b>:" in page and "class='note'" not in page
    assert "allocation.method</code>): <b>svnup</b>" in page
    config = tiny_config(**{"allocation.method": "uniform"})
    config["models"]["tiny"]["note"] = "A tiny random model: it can't rank <allocations>."
    write_config(project, config)
    try:
        plan = planned_jobs(project)
        assert (
            plan["plots"] == 1 and not {*MODEL_STAGES, "budget", "prune", "evaluate"} & plan.keys()
        )
        snakemake(project, "--cores", "2")
        page = (project / "results/tiny/report/report.html").read_text()
        assert "allocation.method</code>): <b>uniform</b>" in page
        assert (
            "<p class='note'>A tiny random model: it can&#x27;t rank &lt;allocations&gt;.</p>"
            in page
        )
    finally:
        write_config(project, tiny_config())
        snakemake(project, "--cores", "2")


def test_new_target_sparsity_plans_no_coalition_jobs(project):
    plan = planned_jobs(project, "results/tiny/s0.6/ppl.json")
    assert plan == {
        "budget": 1,
        "prune": 1,
        "evaluate": 1,
        "collect": 1,
        "configured_pruner": 1,
        "configured_method": 1,
    }


def test_lambda_change_reruns_only_allocation_pruning_evaluation(project):
    write_config(project, tiny_config(**{"allocation.svnup.lambda": 0.3}))
    plan = planned_jobs(project)
    assert not MODEL_STAGES & plan.keys() and "evaluate_dense" not in plan
    assert plan["budget"] == 1 and plan["prune"] == 1 and plan["evaluate"] == 1
    snakemake(project, "--cores", "2")
    changed = _ppl(project, "results/tiny/s0.5/ppl.json")
    assert changed["budget"]["spec"]["lambda"] == 0.3

    write_config(project, tiny_config())
    plan = planned_jobs(project)
    assert not {"budget", "prune", "evaluate"} & plan.keys(), plan
    snakemake(project, "--cores", "2")
    assert _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]["spec"]["lambda"] == 0.2


def test_dataset_change_reruns_only_evaluation(project):
    datasets = ["data/heldout.jsonl", "data/train.jsonl"]
    write_config(project, tiny_config(**{"evaluation.datasets": datasets}))
    plan = planned_jobs(project)
    assert plan["evaluate"] == 2 and plan["evaluate_dense"] == 1
    assert not MODEL_STAGES & plan.keys() and not {"budget", "prune"} & plan.keys(), plan
    write_config(project, tiny_config())
    assert not {"evaluate", "evaluate_dense", "prune"} & planned_jobs(project).keys()


def _move(paths: list[Path], root: Path, target: Path) -> None:
    for path in paths:
        destination = target / path.relative_to(root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)


def _job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a snakemake run: rule name -> job count."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


def test_added_dataset_keeps_finished_evaluations(project):
    """With save_model off a run's checkpoint is gone once its run is collected: pruning again for
    a new dataset must not re-run the finished evaluations; turning save_model on afterwards
    brings the checkpoints back, again without re-running any evaluation."""
    checkpoints = list(project.glob("results/tiny/runs/*/s*/*/*/model"))
    aside = project.parent / f"{project.name}-checkpoints"
    _move(checkpoints, project, aside)  # as a run with save_model off leaves them
    extra = project / "data/extra.jsonl"
    extra.write_text("".join((project / "data/heldout.jsonl").open().readlines()[:40]))
    try:
        datasets = ["data/heldout.jsonl", "data/extra.jsonl"]
        write_config(project, tiny_config(**{"save_model": False, "evaluation.datasets": datasets}))
        run = snakemake(project, "--cores", "2")
        jobs = _job_counts(run.stdout + run.stderr)
        assert jobs["prune"] == 2 and jobs["evaluate"] == 2 and jobs["evaluate_dense"] == 1, jobs
        assert not list(project.glob("results/tiny/runs/*/s*/*/*/model"))

        write_config(project, tiny_config(**{"save_model": True, "evaluation.datasets": datasets}))
        plan = planned_jobs(project)
        assert plan["prune"] == 2 and not {"evaluate", "evaluate_dense"} & plan.keys(), plan
    finally:
        _move(list(aside.glob("results/tiny/runs/*/s*/*/*/model")), aside, project)
        write_config(project, tiny_config())
    # the checkpoints are back; pruning, whose last run wrote pruned layers (save_model off),
    # runs again to write checkpoints, and no evaluation runs again
    plan = planned_jobs(project)
    assert plan.get("prune") == 2 and not {"evaluate", "evaluate_dense"} & plan.keys(), plan
    run = snakemake(project, "--cores", "2")
    jobs = _job_counts(run.stdout + run.stderr)
    assert jobs.get("prune") == 2 and not {"evaluate", "evaluate_dense"} & jobs.keys(), jobs
    assert all((c / "model.safetensors").is_file() for c in checkpoints)


def test_edited_local_inputs_are_new_cache_keys(project, tmp_path):
    """A local dataset or checkpoint edited in place re-plans what depends on it; restoring its
    content finds the earlier results."""
    from safetensors.torch import load_file, save_file

    heldout, weights = project / "data/heldout.jsonl", project / "tiny/model.safetensors"
    for path in (heldout, weights):
        shutil.copy2(path, tmp_path / path.name)  # outside the folders that are fingerprinted
    try:
        with heldout.open("a") as f:
            f.write(json.dumps({"text": "A row added after the first run."}) + "\n")
        plan = planned_jobs(project)
        assert plan["evaluate"] == 2 and plan["evaluate_dense"] == 1, plan
        assert not MODEL_STAGES & plan.keys() and "prune" not in plan, plan
        shutil.copy2(tmp_path / heldout.name, heldout)

        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = tensors[name] * 1.01  # same size and shapes, other numbers
        save_file(tensors, weights, metadata={"format": "pt"})
        plan = planned_jobs(project)
        assert plan["calibrate"] == 1 and plan["evaluate_dense"] == 1, plan
    finally:
        for path in (heldout, weights):
            shutil.copy2(tmp_path / path.name, path)
    assert not {*MODEL_STAGES, "prune", "evaluate", "evaluate_dense"} & planned_jobs(project).keys()


def test_local_paths_written_another_way_plan_nothing(project):
    """A trailing slash, ./ or an absolute path names the same model and datasets: a finished
    run plans no computing job (each spelling used to re-plan every job, coalitions included).
    The bookkeeping that records the datasets as written (collect, summary) may run again."""
    spelled = {
        "models.tiny.path": f"{project}/tiny/",
        "calibration.dataset": "./data/train.jsonl",
        "evaluation.datasets": [str(project / "data" / "heldout.jsonl")],
    }
    write_config(project, tiny_config(**spelled))
    computing = {*MODEL_STAGES, "budget", "prune", "evaluate", "evaluate_dense"}
    try:
        assert not computing & planned_jobs(project).keys()
    finally:
        write_config(project, tiny_config())


def _one_line_error(root: Path, *args: str) -> str:
    """Run snakemake expecting a failure reported in one line; return that line."""
    result = snakemake(root, *args, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Exception" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("svnup: "), output
    return last


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _write_local_tasks(root: Path) -> None:
    """Two small multiple-choice tasks built from the held-out data (no downloads in tests)."""
    texts = [json.loads(line)["text"] for line in (root / "data/heldout.jsonl").open()]
    for seed, name in enumerate(("toy_a", "toy_b")):
        docs = zeroshot.continuation_docs(texts, n_docs=8, seed=seed, context_sentences=1)
        zeroshot.write_choice_task(root / "tasks", name, docs)


@pytest.mark.slow
def test_zero_shot_adds_only_zero_shot_jobs_and_reaches_summary_and_report(project):
    pytest.importorskip("lm_eval", reason=zeroshot.INSTALL_HINT)
    _write_local_tasks(project)
    asked = {"tasks": ["toy_a"], "include_path": "tasks", "batch_size": 4}
    write_config(project, tiny_config(**{"evaluation.zero_shot": asked}))
    plan = planned_jobs(project)
    assert plan["zeroshot"] == 2 and plan["zeroshot_dense"] == 1
    assert not {"prune", "evaluate", "evaluate_dense"} & plan.keys(), plan
    snakemake(project, "--cores", "2")
    run = _ppl(project, "results/tiny/s0.5/ppl.json")
    scored = run["zero_shot"]["tasks"]["toy_a"]
    assert scored["samples"] == 8 and 0 <= scored["acc"] <= 1
    assert run["zero_shot"]["mean_acc"] == scored["acc"]
    assert "toy_a" in _ppl(project, "results/tiny/dense/ppl.json")["zero_shot"]["tasks"]
    with (project / "results/tiny/summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    grid = {"dense", *tiny_config()["targets"]["allocations"]}  # earlier tests ran others
    assert {row["allocation"] for row in rows if row["zero_shot_acc"] != ""} == grid
    assert "Zero-shot accuracy" in (project / "results/tiny/report/report.html").read_text()

    # A new task list re-runs only the zero-shot jobs (and the bookkeeping that gathers them).
    asked["tasks"] = ["toy_a", "toy_b"]
    write_config(project, tiny_config(**{"evaluation.zero_shot": asked}))
    plan = planned_jobs(project)
    assert plan["zeroshot"] == 2 and plan["zeroshot_dense"] == 1
    assert not MODEL_STAGES & plan.keys(), plan
    assert not {"prune", "evaluate", "evaluate_dense", "budget"} & plan.keys(), plan
    write_config(project, tiny_config())


def test_recipe_target_needs_no_pruning(project):
    target = "results/tiny/s0.5/svnup/sparsegpt/recipe.yaml"
    snakemake(project, "--cores", "1", target)
    recipe = yaml.safe_load((project / target).read_text())
    arguments = recipe["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    budget = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    assert arguments["sparsity"] == pytest.approx(budget["sparsities"], abs=1e-6)
    assert not list((project / "results/tiny/runs/svnup/s0.5").glob("sparsegpt")), "pruned"


def _coalition_summaries(root: Path, estimator: str = "swsv", store: str = "*") -> dict[str, dict]:
    """Each coalition job's summary by its output's path under the coalitions folder; ``store``
    narrows them to one store's jobs."""
    summaries = {}
    folder = root / "results/tiny/coalitions"
    for path in folder.glob(f"{store}/{estimator}/*/*.h5"):
        _, attrs = read_records(path)
        summaries[str(path.relative_to(folder))] = json.loads(attrs["evaluation"])
    return summaries


@pytest.mark.slow
def test_window_change_evaluates_only_missing_coalitions(project):
    before = set(_coalition_summaries(project))
    write_config(project, tiny_config(**{"shapley.window": 2}))
    plan = planned_jobs(project)
    assert plan["coalitions"] == 5 and "calibrate" not in plan and "probe" not in plan
    snakemake(project, "--cores", "2")
    new = {k: v for k, v in _coalition_summaries(project).items() if k not in before}
    assert len(new) == 5
    # every coalition inside a 2-block window lies inside some 3-block window: all in the store
    assert all(job["evaluated"] == 0 for job in new.values()), new
    write_config(project, tiny_config())
    assert "coalitions" not in planned_jobs(project)


@pytest.mark.slow
def test_dense_targets_are_a_store_of_their_own(project):
    """``targets: dense`` re-plays the games into a new store on the same calibration and probe;
    the text-target store keeps its key, so reverting re-runs nothing."""
    text = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    write_config(project, tiny_config(**{"shapley.targets": "dense"}))
    plan = planned_jobs(project)
    assert plan["coalitions"] >= 1 and not {"calibrate", "probe"} & plan.keys(), plan
    snakemake(project, "--cores", "2")
    dense = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    assert dense["spec"]["scores"] != text["spec"]["scores"]
    assert dense["sparsities"] != text["sparsities"]
    with chdir(project):
        stores = {
            cfg.key(cfg.store_spec(cfg.model_settings(tiny_config(**o), "tiny")))
            for o in ({}, {"shapley.targets": "dense"})
        }
    assert {p.name for p in (project / "results/tiny/coalitions").iterdir()} >= stores
    write_config(project, tiny_config())
    assert not {"coalitions", "shapley", "budget"} & planned_jobs(project).keys()


@pytest.mark.slow
def test_sparsegpt_probe_plays_a_game_of_its_own(project):
    """``probe_pruner: sparsegpt`` is a new probe, store and game; reverting re-runs nothing."""
    wanda = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    write_config(project, tiny_config(**{"shapley.probe_pruner": "sparsegpt"}))
    plan = planned_jobs(project)
    assert plan["probe"] == 1 and plan["coalitions"] >= 1 and "calibrate" not in plan
    snakemake(project, "--cores", "2")
    sparsegpt = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    assert sparsegpt["spec"]["scores"] != wanda["spec"]["scores"]
    assert sparsegpt["sparsities"] != wanda["sparsities"]
    rewrites = {}  # probe pruner -> whether its probe files hold rewritten weights
    for path in project.glob("results/tiny/probe/*/masks.h5"):
        with h5py.File(path, "r") as f:
            pruner = json.loads(f.attrs["meta"])["spec"]["pruner"]
            rewrites.setdefault(pruner, set()).add("values" in f)
    assert rewrites == {"wanda": {False}, "sparsegpt": {True}}
    write_config(project, tiny_config())
    assert not {"probe", "coalitions", "shapley"} & planned_jobs(project).keys()


def test_a_probe_is_removed_once_its_games_are_played_and_made_again_for_a_new_game(project):
    """With keep_probes off (the default) a probe is deleted once the coalition jobs that read it
    are done; the runs its games allocate then plan no probe, and only a game still to play on
    it makes it again."""
    logs, probes = project / "results/tiny/logs/probe", project / "results/tiny/probe"
    before = {path.stem for path in logs.glob("*.log")}
    dropped = {"keep_probes": False, "shapley.probe_sparsity": 0.6}
    write_config(project, tiny_config(**dropped))
    plan = planned_jobs(project)
    assert plan["probe"] == 1 and plan["coalitions"] >= 1, plan
    snakemake(project, "--cores", "2", "--until", "shapley")
    (made,) = {path.stem for path in logs.glob("*.log")} - before
    assert not (probes / made / "masks.h5").exists()
    assert all((probes / key / "masks.h5").is_file() for key in before)  # kept ones stay
    plan = planned_jobs(project)
    assert plan.get("prune") and not {"probe", "coalitions", "shapley"} & plan.keys(), plan
    write_config(project, tiny_config(**dropped, **{"shapley.window": 2}))
    plan = planned_jobs(project)
    assert plan["probe"] == 1 and plan["coalitions"] >= 1, plan
    write_config(project, tiny_config())
    assert planned_jobs(project) == {}


def test_halves_play_a_game_of_their_own_and_prune_each_layer(project):
    """``players: halves`` re-plays the games over 2 players a block on the same probe; the
    budget, the pruning and the recipe then set each half; reverting re-runs nothing."""
    blocks = _ppl(project, "results/tiny/s0.5/ppl.json")["budget"]
    halves_config = tiny_config(**{"shapley.players": "halves"})
    write_config(project, halves_config)
    plan = planned_jobs(project)
    assert plan["coalitions"] >= 1 and not {"calibrate", "probe"} & plan.keys(), plan
    recipe = "results/tiny/s0.5/svnup/wanda/recipe.yaml"
    snakemake(project, "--cores", "2", "all", recipe)
    run = _ppl(project, "results/tiny/s0.5/ppl.json")
    budget = run["budget"]
    assert budget["spec"]["scores"] != blocks["spec"]["scores"]
    names = [p["name"] for p in budget["players"]]
    assert names == [f"{b}.{half}" for b in range(6) for half in ("attention", "mlp")]
    params = [p["params"] for p in budget["players"]]
    mean = sum(s * n for s, n in zip(budget["player_sparsities"], params, strict=True))
    assert mean / sum(params) == pytest.approx(0.5, abs=1e-9)
    assert len(set(budget["player_sparsities"])) > 6  # the halves of a block differ
    for block, layers in zip(run["pruning"]["blocks"], budget["layer_sparsities"], strict=True):
        for layer in block["layers"]:
            assert layer["sparsity"] == pytest.approx(layers[layer["name"]], abs=1 / 32)
    text = (project / recipe).read_text()
    assert "model.layers.0.self_attn.q_proj" in text and "model.layers.5.mlp.down_proj" in text
    with chdir(project):
        settings = cfg.model_settings(halves_config, "tiny")
        store = cfg.key(cfg.store_spec(settings))
    masks = set()
    for job in project.glob(f"results/tiny/coalitions/{store}/swsv/*/*.h5"):
        records, attrs = read_records(job)
        assert attrs["n_blocks"] == 12 and len(json.loads(attrs["players"])) == 12
        masks.update(records)
    assert max(masks) < 1 << 12 and any(m.bit_count() == 1 and m & 0xAAA for m in masks)
    write_config(project, tiny_config())
    assert not {"coalitions", "shapley", "budget", "prune"} & planned_jobs(project).keys()


def test_type_split_plays_a_type_game_a_level_and_splits_each_half(project):
    """``svnup-fit.split: types``: one type game a level, on the halves' probes (removed only
    once the type game has read them), whose curves split each half between its layers at the
    half's own sparsity; the type game's coalitions land in the store of a layers game."""
    fit = {"levels": [0.3, 0.5], "split": "types"}
    overrides = {
        "shapley.players": "halves",
        "shapley.estimator": "loo",
        "allocation.svnup-fit": fit,
        "keep_probes": False,
    }
    config = tiny_config(**overrides)
    write_config(project, config)
    target = "results/tiny/s0.5/svnup-fit/wanda/ppl.json"
    try:
        plan = planned_jobs(project, target)
        assert plan["type_game"] == 2 and plan["curve"] == 1, plan
        snakemake(project, "--cores", "2", target)
        run = _ppl(project, target)
        budget = run["budget"]
        assert set(budget["type_curves"]) == set(budget["layer_sparsities"][0])
        splits = [
            {budget["layer_sparsities"][player["block"]][name] for name in player["layers"]}
            for player in budget["players"]
        ]
        assert sum(len(split) > 1 for split in splits) >= 4, splits  # a half's types differ
        pruned = {
            (b, layer["name"]): layer["sparsity"]
            for b, block in enumerate(run["pruning"]["blocks"])
            for layer in block["layers"]
        }
        for (b, name), sparsity in pruned.items():
            assert sparsity == pytest.approx(budget["layer_sparsities"][b][name], abs=1 / 32)
        with chdir(project):
            settings = cfg.model_settings(config, "tiny")
            games = [cfg.at_probe(settings, level) for level in fit["levels"]]
            stores = [cfg.key(cfg.type_game_spec(game)) for game in games]
        for store in stores:
            game = json.loads(
                (project / f"results/tiny/type-games/{store}/damage.json").read_text()
            )
            assert len(game["damage"]) == 7 and game["coalitions"] == 8
            assert (project / f"results/tiny/coalitions/{store}/store").is_dir()
        assert planned_jobs(project, target) == {}
        write_config(
            project, tiny_config(**{**overrides, "allocation.svnup-fit": {"levels": fit["levels"]}})
        )
        plan = planned_jobs(project, target)
        assert "type_game" not in plan and plan["curve"] == 1, plan
    finally:
        write_config(project, tiny_config())


def test_svnup_types_plays_the_type_games_alone_and_keeps_each_half_at_the_target(project):
    """svnup-types: no coalition game, one type game a level (the same files svnup-fit's split:
    types reads at those levels), every half at the target split by the type curves."""
    levels = [0.35, 0.55]  # levels no other test plays, whose type games this test makes
    config = tiny_config(**{"allocation.svnup-types": {"levels": levels}})
    write_config(project, config)
    target = "results/tiny/s0.5/svnup-types/wanda/ppl.json"
    try:
        plan = planned_jobs(project, target)
        assert plan["type_game"] == 2 and plan["curve"] == 1, plan
        assert not {"coalitions", "shapley"} & plan.keys(), plan
        snakemake(project, "--cores", "2", target)
        assert _ppl(project, target)["budget"]["type_curves"]
        (path,) = project.glob("results/tiny/budget/svnup-types/*/s0.5.json")
        budget = json.loads(path.read_text())
        halves = 2 * len(budget["sparsities"])
        assert len(budget["players"]) == halves and budget["player_sparsities"] == [0.5] * halves
        for player in budget["players"]:
            layers = budget["layer_sparsities"][player["block"]]
            weights = [budget["layer_params"][player["block"]][n] for n in player["layers"]]
            mean = sum(layers[n] * w for n, w in zip(player["layers"], weights, strict=True))
            mean /= sum(weights)
            assert mean == pytest.approx(0.5, abs=1e-12)
            assert len({layers[n] for n in player["layers"]}) > 1, layers  # types differ
        assert budget["scores"]["source"] == "types"
        split = {"levels": levels, "split": "types"}
        overrides = {"shapley.players": "halves", "shapley.estimator": "loo"}
        write_config(project, tiny_config(**overrides, **{"allocation.svnup-fit": split}))
        plan = planned_jobs(project, "results/tiny/s0.5/svnup-fit/wanda/ppl.json")
        assert "type_game" not in plan and plan["coalitions"] == 2, plan  # the same type games
        blocks = {"levels": levels, "unit": "blocks"}
        write_config(project, tiny_config(**{"allocation.svnup-types": blocks}))
        plan = planned_jobs(project, target)  # another unit: the same type games, a new curve
        assert plan.keys() >= {"curve", "budget", "prune"}, plan
        assert not {"type_game", "coalitions"} & plan.keys(), plan
    finally:
        write_config(project, tiny_config())


def test_evopress_and_lsa_by_projection_give_each_linear_layer_its_sparsity(project):
    """EvoPress's level database is built once per target and pruner, its search journals and
    resumes, and both per-linear methods reach pruning through the budget's layer players;
    more generations re-run the search on the same database."""
    evopress = {**EVOPRESS, "probe_pruner": "match", "generations": 3, "weights_diff": 0.05}
    config = tiny_config(
        **{"allocation.evopress": evopress, "allocation.lsa": {"granularity": "projection"}}
    )
    write_config(project, config)
    targets = [f"results/tiny/s0.5/{m}/{p}/ppl.json" for m in ("evopress", "lsa") for p in PRUNERS]
    plan = planned_jobs(project, *targets)
    assert plan["levels"] == 3 and plan["search"] == 3 and plan["metric"] == 1, plan
    searches, databases = "results/tiny/search/evopress/*/s0.5.json", "results/tiny/levels/evopress"
    before = set(project.glob(searches)), set(project.glob(f"{databases}/*/s0.5.h5"))
    snakemake(project, "--cores", "2", *targets)
    names = [f"{b}.{layer}" for b in range(6) for layer in LLAMA_LAYERS]
    moved = {}
    for target in targets:
        run = _ppl(project, target)
        budget = run["budget"]
        assert [p["name"] for p in budget["players"]] == names, target
        assert budget["achieved"] == pytest.approx(0.5, abs=1e-9)
        moved[target] = len(set(budget["player_sparsities"])) > 1
        for block, layers in zip(run["pruning"]["blocks"], budget["layer_sparsities"], strict=True):
            for layer in block["layers"]:
                assert layer["sparsity"] == pytest.approx(layers[layer["name"]], abs=1 / 32)
    # LSA always differs per layer; a 3-generation search on a random model may keep uniform
    # (its elitism re-scores the parent) for one pruner, not for all
    assert all(moved[t] for t in targets if "/lsa/" in t), moved
    assert any(moved[t] for t in targets if "/evopress/" in t), moved
    new_searches = set(project.glob(searches)) - before[0]  # not the every-method test's
    assert len(new_searches) == 3
    chosen = []
    for path in new_searches:
        search = json.loads(path.read_text())
        assert [h["generation"] for h in search["history"]] == [0, 1, 2]
        assert not path.with_suffix(".journal").exists()
        chosen.append(search["chosen_levels"])
        assert sum(chosen[-1]) == 0, chosen[-1]
    assert any(any(levels) for levels in chosen), chosen  # as above: not every search stays put
    assert len(set(project.glob(f"{databases}/*/s0.5.h5")) - before[1]) == 3
    write_config(project, tiny_config(**{"allocation.evopress": {**evopress, "generations": 4}}))
    plan = planned_jobs(project, *targets[:3])
    assert plan["search"] == 3 and "levels" not in plan and "metric" not in plan, plan
    _seeded_search_starts_at_svnup_fits_allocation(project, evopress)
    write_config(project, tiny_config())


def _seeded_search_starts_at_svnup_fits_allocation(project: Path, evopress: dict) -> None:
    """``start: svnup-fit``: the search reads svnup-fit's budget for its pruner (the run's, with
    ``probe_pruner: match``) from the same database, and starts at its nearest levels."""
    from svnup.evopress import LevelDatabase, nearest_levels, within_bounds

    config = tiny_config(**{"allocation.evopress": {**evopress, "start": "svnup-fit"}})
    write_config(project, config)
    target = "results/tiny/s0.5/evopress/wanda/ppl.json"
    plan = planned_jobs(project, target)
    assert plan["search"] == 1 and "levels" not in plan, plan
    snakemake(project, "--cores", "2", target)
    with chdir(project):
        s = cfg.model_settings(config, "tiny")
        search_key = cfg.key(cfg.score_spec(s, "evopress", "wanda"))
        budget_key = cfg.key(cfg.budget_spec(s, "svnup-fit", "wanda"))
        database_key = cfg.key(cfg.database_spec(s, "evopress", "wanda"))
    search = json.loads(
        (project / f"results/tiny/search/evopress/{search_key}/s0.5.json").read_text()
    )
    budget = json.loads(
        (project / f"results/tiny/budget/svnup-fit/{budget_key}/s0.5.json").read_text()
    )
    assert search["spec"]["start_budget"] == budget_key
    db = LevelDatabase(project / f"results/tiny/levels/evopress/{database_key}/s0.5.h5")
    step = db.meta["step"]
    units = [
        within_bounds(u, 0.5, step, (s["allocation"]["min"], s["allocation"]["max"]))
        for u in db.units
    ]
    db.close()
    sparsities = [budget["sparsities"][u.block] for u in units]  # block players
    assert search["start_levels"] == nearest_levels(units, sparsities, 0.5, step)
    assert any(search["start_levels"]), "svnup-fit's allocation is not uniform"
    assert _ppl(project, target)["budget"]["spec"]["scores"] == search_key


def test_match_probe_is_each_pruners_own_game():
    """``probe_pruner: match`` gives each pruner's runs exactly the game (probe, store, Shapley
    values, curves) that naming that pruner as the probe gives, and a probe-free method one
    budget for both."""
    pruners = {"targets.pruners": ["wanda", "sparsegpt"]}
    match = cfg.model_settings(tiny_config(**pruners, **{"shapley.probe_pruner": "match"}), "tiny")
    with pytest.raises(ValueError, match="match"):
        cfg.probe_spec(match)
    probes = {cfg.key(cfg.probe_spec(game)) for game in cfg.games(match)}
    assert len(probes) == len(cfg.probe_levels(match)) * len(PRUNERS)
    for method in ("svnup", "loo", "svnup-fit", "owl", "uniform"):
        budgets = {}
        for pruner in ("wanda", "sparsegpt"):
            named = tiny_config(**pruners, **{"shapley.probe_pruner": pruner})
            expected = cfg.budget_spec(cfg.model_settings(named, "tiny"), method, pruner)
            budgets[pruner] = cfg.budget_spec(match, method, pruner)
            assert budgets[pruner] == expected, (method, pruner)
        source = ALLOCATIONS[method].source
        played = source is not None and source.kind in ("shapley", "levels")
        assert (budgets["wanda"] != budgets["sparsegpt"]) == played, method


@pytest.mark.slow
def test_match_probe_runs_each_pruner_with_its_own_game(project):
    """A config pruning with Wanda and SparseGPT under ``probe_pruner: match``: each run's
    budget reads the game (or damage curves) its pruner probes, and naming the probe instead
    re-runs nothing."""
    methods = ("svnup", "svnup-fit")
    pruners = {"targets.pruners": ["wanda", "sparsegpt"], "targets.allocations": list(methods)}
    write_config(project, tiny_config(**pruners, **{"shapley.probe_pruner": "match"}))
    snakemake(project, "--cores", "2")
    with chdir(project):  # the model spec fingerprints the model at its workflow path
        for method in methods:
            runs = {}
            for pruner in ("wanda", "sparsegpt"):
                runs[pruner] = _ppl(project, f"results/tiny/s0.5/{method}/{pruner}/ppl.json")
                named = cfg.model_settings(
                    tiny_config(**pruners, **{"shapley.probe_pruner": pruner}), "tiny"
                )
                spec = json.loads(json.dumps(cfg.budget_spec(named, method, pruner)))
                assert runs[pruner]["budget"]["spec"] == spec, (method, pruner)
            sparsities = [run["budget"]["sparsities"] for run in runs.values()]
            assert sparsities[0] != sparsities[1], method
    named = {"targets.pruners": ["sparsegpt"], "shapley.probe_pruner": "sparsegpt"}
    write_config(project, tiny_config(**{**pruners, **named}))
    stages = {"probe", "coalitions", "shapley", "curve", "budget", "prune", "evaluate"}
    targets = [f"results/tiny/s0.5/{method}/sparsegpt/ppl.json" for method in methods]
    assert not stages & planned_jobs(project, *targets).keys()
    write_config(project, tiny_config())


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_summary_matches_every_run_after_a_change_is_reverted(project):
    """The window change of the previous test, reverted and re-run: the summary must hold the
    numbers of the runs the config asks for, never an alias copy, a run of an earlier grid (the
    stray file) or a run outside the grid (every allocation method ran in an earlier test)."""
    stray = project / "results/tiny/s0.9/uniform/wanda/ppl.json"
    stray.parent.mkdir(parents=True)
    run = {"allocation": "uniform", "pruner": "wanda", "target_sparsity": 0.9}
    stray.write_text(json.dumps({**run, "perplexity": {"data/heldout.jsonl": 1e6}}))
    snakemake(project, "--cores", "2")
    rows = _rows(project / "results/tiny/summary.csv")
    declared = {"results/tiny/dense/ppl.json"} | {
        f"results/tiny/s0.5/{allocation}/wanda/ppl.json" for allocation in ("svnup", "uniform")
    }
    assert {row["path"] for row in rows} == declared
    numbers = {(r["allocation"], float(r["sparsity"]), r["dataset"]): float(r["ppl"]) for r in rows}
    aliases = {"results/tiny/s0.5/ppl.json", "results/tiny/s0.5/svnup/ppl.json"}
    for path in (project / p for p in declared | aliases):
        ppl = json.loads(path.read_text())
        sparsity = ppl["target_sparsity"] or 0.0
        for dataset, value in ppl["perplexity"].items():
            assert numbers[(ppl["allocation"] or "dense", sparsity, dataset)] == value, path
    stray.unlink()


def test_damaged_calibration_is_named_before_any_job_deletes_anything(project, tmp_path):
    calibration = next(project.glob("results/tiny/calibration/*/calibration.h5"))
    masks = next(project.glob("results/tiny/probe/*/masks.h5"))
    masks_time = masks.stat().st_mtime_ns
    shutil.copy2(calibration, tmp_path / calibration.name)
    _truncate(calibration)
    try:
        line = _one_line_error(project, "--cores", "1")
        assert f"{calibration.relative_to(project)} is truncated or corrupt" in line
        assert "delete it and re-run" in line
        assert masks.stat().st_mtime_ns == masks_time, "a job ran and replaced an earlier output"
    finally:
        shutil.copy2(tmp_path / calibration.name, calibration)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("results/tiny/coalitions/{store}/store/coalitions.h5", "journals beside it are kept"),
        ("tiny/model.safetensors", "restore it, or download the model again"),
        ("{run}/model/model.safetensors", "prunes it again"),
        ("{run}/eval/*.json", "delete it and re-run"),
    ],
)
def test_damaged_files_are_named_with_how_to_recover(project, tmp_path, pattern, message):
    # the run folder of the current config (those of earlier configs lie beside it); the runs
    # are complete and collected with save_model on since the previous test
    current = _ppl(project, "results/tiny/s0.5/svnup/wanda/ppl.json")
    run = Path(current["checkpoint"]).parent
    # the coalition store of the current game (earlier tests leave stores of other games)
    (scores,) = project.glob(f"results/tiny/shapley/*/{current['budget']['spec']['scores']}")
    store = json.loads((scores / "scores.json").read_text())["spec"]["store"]
    path = next(project.glob(pattern.format(run=run, store=store)))
    shutil.copy2(path, tmp_path / path.name)
    _truncate(path)
    try:
        line = _one_line_error(project, "--dry-run")
        assert f"{path.relative_to(project)} is truncated or corrupt" in line and message in line
    finally:
        shutil.copy2(tmp_path / path.name, path)


def _failure(result, rule: str) -> tuple[str, Path]:
    """The console line of the failed job of ``rule`` (svnup.joblog): its reason and its log."""
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith(f"svnup: {rule} failed: ")]
    assert len(lines) == 1, output
    reason, log = lines[0].removeprefix(f"svnup: {rule} failed: ").rsplit("; log: ", 1)
    return reason, Path(log)


def test_a_row_only_the_job_reads_fails_with_its_reason_on_the_quiet_console(project):
    """The default profile (quiet: rules) drops Snakemake's error block of a failed job."""
    rows = (project / "data/train.jsonl").read_text().splitlines()
    rows[499] = json.dumps({"txt": "the 500th row has no text"})
    broken = project / "data/broken.jsonl"
    broken.write_text("\n".join(rows) + "\n")
    write_config(project, tiny_config(**{"calibration.dataset": "data/broken.jsonl"}))
    try:
        result = snakemake(project, "--cores", "1", check=False)
    finally:
        write_config(project, tiny_config())
        broken.unlink()
    reason, log = _failure(result, "calibrate")
    assert reason == f"{broken}: line 500 has no 'text' field: give each row one"
    assert log.parts[:4] == ("results", "tiny", "logs", "calibrate") and log.suffix == ".log"
    assert reason in (project / log).read_text()
    assert "Traceback" not in result.stdout + result.stderr


def test_a_damaged_input_of_a_quiet_rule_fails_with_its_reason_on_the_console(project, tmp_path):
    """A rule whose command writes only to its log (no progress bars): before, the console said
    nothing but ``CalledProcessError ... exit status 1``."""
    dense = project / "results/tiny/dense/ppl.json"
    shutil.copy2(dense, tmp_path / "ppl.json")
    dense.write_text(json.dumps({"model": "tiny"}))  # valid JSON, but not a run's numbers
    try:
        result = snakemake(project, "--cores", "1", check=False)
    finally:
        shutil.copy2(tmp_path / "ppl.json", dense)
    reason, log = _failure(result, "summary")
    assert reason == "unexpected KeyError: 'perplexity'; the traceback is in the log"
    assert log == Path("results/tiny/logs/summary.log")
    assert "Traceback (most recent call last)" in (project / log).read_text()
    snakemake(project, "--cores", "2")  # the failed job's summary was removed: make it again


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _recorded_masks(store: Path) -> list[int]:
    """Every coalition recorded in the store, once per time it was evaluated: the published file
    and each journal's complete lines."""
    masks = (
        list(read_records(store / "coalitions.h5")[0]) if (store / "coalitions.h5").exists() else []
    )
    for journal in (store / "journal").glob("*.jsonl"):
        for line in journal.read_bytes().split(b"\n")[1:-1]:
            entry = json.loads(line)
            if "mask" in entry:
                masks.append(int(entry["mask"], 16))
    return masks


def _process_group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_run_of_two_estimators_evaluates_each_coalition_once(project):
    """Exact Shapley and leave-one-out share the store and run at once (loo's coalitions are a
    subset of exact's); the run is killed mid-way and resumed."""
    config = tiny_config(
        **{
            "shapley.estimator": "exact",
            "shapley.eval_samples": 8,
            "calibration.nsamples": 8,
            "targets.allocations": ["svnup", "loo"],
        }
    )
    write_config(project, config)
    targets = [f"results/tiny/s0.5/{a}/wanda/ppl.json" for a in ("svnup", "loo")]
    command, env = snakemake_command(project, "--cores", "2", *targets, "--until", "shapley")
    runner = subprocess.Popen(
        command,
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        journal = _wait_for(
            lambda: next(
                (project / "results/tiny/coalitions").glob("*/store/journal/exact.jsonl"), None
            ),
            300,
            "the exact job's journal",
        )
        _wait_for(lambda: len(journal.read_text().splitlines()) > 6, 120, "journalled coalitions")
        os.killpg(runner.pid, signal.SIGKILL)
    finally:
        runner.wait()
        _wait_for(lambda: _process_group_gone(runner.pid), 30, "the killed jobs to exit")
    store = journal.parent.parent
    before = _recorded_masks(store)
    assert len(before) == len(set(before)), "a coalition was evaluated by both estimators"
    outputs = list(store.parent.glob("exact/*/exact.h5"))
    assert outputs == [], "a killed job must leave no output that looks complete"

    snakemake(project, "--unlock")
    snakemake(project, "--cores", "2", *targets, "--until", "shapley")
    # earlier tests leave loo jobs of other stores (other players) in the shared project
    (exact_job,) = _coalition_summaries(project, "exact", store.parent.name).values()
    (loo_job,) = _coalition_summaries(project, "loo", store.parent.name).values()
    assert exact_job["coalitions"] == 64 and loo_job["coalitions"] == 7
    assert len(set(before)) + exact_job["evaluated"] + loo_job["evaluated"] == 64
    assert len(read_records(store / "coalitions.h5")[0]) == 64
    log = next((project / "results/tiny/logs/coalitions").glob("*/exact/*/exact.log")).read_text()
    assert "already in the store" in log and "claimed by other running jobs" in log
    write_config(project, tiny_config())


def _evaluated(console: str) -> int:
    """Coalitions a run's jobs evaluated: the total of each evaluation's progress bar."""
    return sum(int(n) for n in re.findall(r"coalitions:\s+0%\|[^|]*\| 0/(\d+)", console))


def test_concurrent_runs_sharing_coalition_jobs_evaluate_each_coalition_once(project):
    """Two ``--nolock`` runs on different targets need the same new coalition jobs (a new store:
    more evaluation samples); the second run of each job waits for the first."""
    write_config(project, tiny_config(**{"shapley.eval_samples": 6}))
    runs = []
    try:
        for sparsity in ("0.5", "0.6"):
            target = f"results/tiny/s{sparsity}/svnup/wanda/ppl.json"
            command, env = snakemake_command(project, target, "--cores", "1", "--nolock")
            runs.append(
                subprocess.Popen(
                    command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
            )
        consoles = [run.communicate(timeout=900)[0].decode() for run in runs]
    finally:
        for run in runs:
            run.kill()
        write_config(project, tiny_config())
    for run, console in zip(runs, consoles, strict=True):
        assert run.returncode == 0, console
        assert "Traceback" not in console and " error: " not in console, console
    with chdir(project):
        settings = cfg.model_settings(tiny_config(**{"shapley.eval_samples": 6}), "tiny")
        store = project / f"results/tiny/coalitions/{cfg.key(cfg.store_spec(settings))}/store"
    recorded = read_records(store / "coalitions.h5")[0]
    assert len(recorded) > 0 and not list((store / "journal").iterdir())
    assert sum(map(_evaluated, consoles)) == len(recorded), "a coalition was evaluated twice"


def test_a_rerun_job_keeps_its_previous_output_readable_until_it_replaces_it(project):
    """Snakemake deletes a job's outputs before it runs the job; so a second ``--nolock`` run
    that re-runs a job would delete the file the first run's next job is reading. Outputs are
    kept until the job replaces them (atomically): a reader polling the Shapley values while
    their jobs re-run never finds one gone."""
    scores = sorted(project.glob("results/tiny/shapley/*/*/scores.json"))
    before = {path: path.stat().st_mtime_ns for path in scores}
    gone, stop = set(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            gone.update(path for path in scores if not path.exists())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        snakemake(project, "--cores", "1", "--forcerun", "shapley", "--until", "shapley")
    finally:
        stop.set()
        watcher.join()
    assert any(path.stat().st_mtime_ns != before[path] for path in scores), "none re-ran"
    assert not gone, f"deleted while their jobs re-ran: {sorted(map(str, gone))}"
    snakemake(project, "--cores", "2")  # the rest re-run too: a finished project again


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"shapley.windw": 3}, "config key 'shapley.windw': unknown key"),
        (
            {"shapley.window": "four"},
            "config key 'shapley.window': 'four' is not of type 'integer'",
        ),
        ({"targets.sparsities": [1.2]}, "config key 'targets.sparsities.0'"),
        ({"allocation.min": 0.6}, "target sparsity 0.5 cannot be a mean"),
        ({"targets.models": ["llama-70b"]}, "model 'llama-70b' is not in config key 'models'"),
        ({"shapley.window": 7}, "'shapley.window' of model 'tiny': window 7 exceeds the model's 6"),
        ({"shapley.stride": 4}, "'shapley.stride' of model 'tiny': stride 4 exceeds"),
        (
            {"shapley.estimator": "permutation", "shapley.n_permutations": 3},
            "'shapley.n_permutations' of model 'tiny': 3 is odd",
        ),
        ({"models.tiny.seqlen": 300}, "'models.tiny.seqlen': 300 exceeds the model's context"),
        ({"evaluation.split": "testing"}, "'evaluation.split' of model 'tiny': 'testing' is not"),
        ({"calibration.dataset": "data/gone.jsonl"}, "'calibration.dataset' of model 'tiny'"),
        ({"evaluation.datasets": ["data/gone.jsonl"]}, "'evaluation.datasets' of model 'tiny'"),
        ({"shapley.players": "thirds"}, "config key 'shapley.players': 'thirds' is not one of"),
        (
            {"shapley.players": "halves", "shapley.ablation": "skip"},
            "'shapley.players' of model 'tiny': halves needs shapley.ablation: prune",
        ),
        (
            {"allocation.svnup-fit": {"split": "types"}, "shapley.ablation": "skip"},
            "'allocation.svnup-fit.split' of model 'tiny': types prunes each layer type",
        ),
        (
            {"allocation.svnup-fit": {"split": "types"}, "shapley.players": "layers"},
            "'allocation.svnup-fit.split' of model 'tiny': with shapley.players: layers",
        ),
        (
            {"targets.allocations": ["svnup-types"], "shapley.ablation": "skip"},
            "'shapley.ablation' of model 'tiny': svnup-types prunes each layer type",
        ),
        (
            {"allocation.svnup-types": {"unit": "layers"}},
            "config key 'allocation.svnup-types.unit': 'layers' is not one of",
        ),
        (
            {"allocation.svnup-fit": {"split": "layers"}},
            "config key 'allocation.svnup-fit.split': 'layers' is not one of",
        ),
    ],
)
def test_bad_config_fails_before_any_job_with_one_line(project, override, message):
    write_config(project, tiny_config(**override))
    try:
        assert message in _one_line_error(project, "--dry-run")
    finally:
        write_config(project, tiny_config())


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("results/nomodel/s0.5/ppl.json", "model 'nomodel' is not in config key 'models'"),
        ("results/tiny/s1.5/ppl.json", "target sparsity 1.5 must be in (0, 1)"),
        ("results/tiny/s0.7x/ppl.json", "'s0.7x' does not name a target sparsity"),
        ("results/tiny/s-0.5/ppl.json", "'s-0.5' does not name a target sparsity"),
        ("results/tiny/s0.7.1/ppl.json", "'s0.7.1' does not name a target sparsity"),
        ("results/tiny/s0.5/uniform/foo/ppl.json", "unknown pruner 'foo'"),
    ],
)
def test_bad_target_path_is_named(project, target, message):
    assert message in _one_line_error(project, "--dry-run", target)


def test_model_level_targets_replace_the_grid_for_that_model(project, tmp_path):
    """A model's own targets decide its summary, its report and which of its files are checked
    before planning; the keys it leaves out come from targets.*."""
    config = tiny_config()
    config["models"]["tiny"]["targets"] = {"sparsities": [0.6], "allocations": ["uniform"]}
    write_config(project, config)
    try:
        plan = planned_jobs(project)
        assert plan["summary"] == 1 and plan["plots"] == 1 and "calibrate" not in plan, plan
        snakemake(project, "--cores", "2")
        paths = {row["path"] for row in _rows(project / "results/tiny/summary.csv")}
        assert paths == {"results/tiny/dense/ppl.json", "results/tiny/s0.6/uniform/wanda/ppl.json"}
        assert (project / "results/tiny/s0.6/ppl.json").exists()  # the configured method's
        budget = next(project.glob("results/tiny/budget/uniform/*/s0.6.json"))
        shutil.copy2(budget, tmp_path / budget.name)
        _truncate(budget)
        try:
            line = _one_line_error(project, "--dry-run")
            assert f"{budget.relative_to(project)} is truncated or corrupt" in line
        finally:
            shutil.copy2(tmp_path / budget.name, budget)
        config["models"]["tiny"]["targets"] = {"sparsities": [0.995]}
        write_config(project, config)
        line = _one_line_error(project, "--dry-run")
        assert "models.tiny.targets.sparsities: target sparsity 0.995 cannot be a mean" in line
    finally:
        write_config(project, tiny_config())
    snakemake(project, "--cores", "2")  # the global grid's summary and report again


def test_gguf_entries_convert_once_and_load_like_their_folder(project, tmp_path, monkeypatch):
    """The tiny model written as a GGUF file, named by path and as a package's file: one
    conversion for both (same content), and the numbers of the folder it was written from."""
    from conftest import write_tiny_gguf
    from test_gguf import install_fake_distribution

    pytest.importorskip("gguf")
    file = write_tiny_gguf(project / "tiny", tmp_path / "tiny.gguf")
    shutil.copy(file, project / "tiny.gguf")
    package = install_fake_distribution(tmp_path / "site", file)
    paths = [str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    config = tiny_config()
    entry = {"seqlen": 48, "batch_size": 8}
    config["models"].update(
        tinygguf={"path": "tiny.gguf", **entry},
        tinypkg={"path": package, **entry},
        uninstalled={"path": "package:nosuch/model.gguf", **entry},
    )
    write_config(project, config)
    target = "s0.5/uniform/wanda/ppl.json"
    try:
        assert planned_jobs(project) == {}, "an entry not asked for is never resolved"
        run = snakemake(project, "--cores", "2", f"results/tinygguf/{target}")
        assert _job_counts(run.stdout + run.stderr)["convert_gguf"] == 1
        (converted,) = project.glob("results/gguf/*/config.json")
        record = json.loads((converted.parent / "conversion.json").read_text())
        assert converted.parent.name == cfg.key({"gguf": record["sha256"]})
        ppl = _ppl(project, f"results/tinygguf/{target}")
        folder = _ppl(project, f"results/tiny/{target}")
        assert ppl["perplexity"] == pytest.approx(folder["perplexity"], rel=1e-5)
        plan = planned_jobs(project, f"results/tinypkg/{target}")
        assert "convert_gguf" not in plan and plan["calibrate"] == 1, plan
        line = _one_line_error(project, "--dry-run", "results/uninstalled/summary.csv")
        assert "'models.uninstalled.path': no installed distribution provides the package" in line
    finally:
        write_config(project, tiny_config())


def test_lint_and_format():
    for command in (
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(SNAKEFILE)],
        [shutil.which("snakefmt") or "snakefmt", "--check", str(REPO)],
    ):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
