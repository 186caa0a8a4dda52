"""The real snakemake on a tiny project: end to end, then what each config change re-plans.

The tests run in order on one project (module scope): each changes the config, asserts on what a
dry run plans, and where needed runs the change so the next test starts from a finished state.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
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

from svnup import zeroshot
from svnup.registry import ALLOCATIONS
from svnup.store import read_records

pytestmark = pytest.mark.workflow

MODEL_STAGES = {"calibrate", "probe", "coalitions", "shapley", "metric", "search"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = build_project(tmp_path_factory.mktemp("workflow"))
    snakemake(root, "--cores", "2")
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


def test_every_registered_allocation_method_runs(project):
    """The registry, the schema, the wildcards and the rules agree: every method runs, and a
    method that searches with the run's pruner gets one search and one budget per pruner."""
    overrides = {"allocation.atp": {"step": 0.05}, "allocation.svnup-fit": {"levels": [0.3, 0.5]}}
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


def _write_local_tasks(root: Path) -> None:
    """Two small multiple-choice tasks built from the held-out data (no downloads in tests)."""
    texts = [json.loads(line)["text"] for line in (root / "data/heldout.jsonl").open()]
    for seed, name in enumerate(("toy_a", "toy_b")):
        docs = zeroshot.continuation_docs(texts, n_docs=8, seed=seed, context_sentences=1)
        zeroshot.write_choice_task(root / "tasks", name, docs)


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


def _coalition_summaries(root: Path, estimator: str = "swsv") -> dict[str, dict]:
    summaries = {}
    for path in (root / "results/tiny/coalitions").glob(f"*/{estimator}/*/*.h5"):
        _, attrs = read_records(path)
        summaries[f"{path.parent.name}/{path.stem}"] = json.loads(attrs["evaluation"])
    return summaries


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


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_coalition_job_resumes(project):
    """Kill the only coalition job of the exact estimator mid-way; the rerun keeps its work."""
    config = tiny_config(
        **{"shapley.estimator": "exact", "shapley.eval_samples": 8, "calibration.nsamples": 8}
    )
    write_config(project, config)
    command, env = snakemake_command(project, "--cores", "1", "results/tiny/s0.5/ppl.json")
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
        subprocess.run(["pkill", "-9", "-f", f"svnup coalitions.*{project}"], check=False)
    done_before_kill = len(journal.read_text().splitlines()) - 1
    outputs = list((project / "results/tiny/coalitions").glob("*/exact/*/exact.h5"))
    assert outputs == [], "a killed job must leave no output that looks complete"

    snakemake(project, "--unlock")
    snakemake(project, "--cores", "2", "--rerun-incomplete", "results/tiny/s0.5/ppl.json")
    (summary,) = _coalition_summaries(project, "exact").values()
    assert summary["coalitions"] == 64
    assert summary["evaluated"] <= 64 - done_before_kill
    log = next((project / "results/tiny/logs/coalitions").glob("*/exact/*/exact.log")).read_text()
    assert f"{64 - summary['evaluated']} already in the store" in log
    write_config(project, tiny_config())


def _run_error(root: Path, *targets: str) -> str:
    result = snakemake(root, "--dry-run", *targets, check=False)
    assert result.returncode != 0
    return result.stdout + result.stderr


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
    ],
)
def test_bad_config_fails_before_any_job_with_one_line(project, override, message):
    write_config(project, tiny_config(**override))
    try:
        assert message in _run_error(project)
    finally:
        write_config(project, tiny_config())


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("results/nomodel/s0.5/ppl.json", "model 'nomodel' is not in config key 'models'"),
        ("results/tiny/s1.5/ppl.json", "target sparsity 1.5 must be in (0, 1)"),
    ],
)
def test_bad_target_path_is_named(project, target, message):
    assert message in _run_error(project, target)


def test_lint_and_format():
    for command in (
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(SNAKEFILE)],
        [shutil.which("snakefmt") or "snakefmt", "--check", str(REPO)],
    ):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
