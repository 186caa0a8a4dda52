"""Workflow against library: the Snakemake pipeline must give the library's numbers, bit for bit.

Why: the workflow splits the pipeline into processes that hand each other files (calibration
statistics in HDF5, probe masks bit-packed, coalition records journalled per window, budgets in
JSON, pruned checkpoints in safetensors). Any lossy hand-over or any setting that a rule passes
differently would change the perplexities without failing a test. So the same config is run twice
on c4-llama-12L: once through ``snakemake``, once in this process through the library API only
(``svnup.models`` ... ``svnup.perplexity``, never ``svnup.stages`` or the CLI), both with one torch
thread per process, and every perplexity, Shapley value and block sparsity is compared.

The workflow runs in ``--workdir`` with ``models`` and ``data`` symlinked to ``../shared`` and
``benchmarks/configs/c4-llama-12L.yaml`` copied in as ``config.yaml``. Each path's numbers are
stored there, so ``--skip-workflow`` / ``--skip-library`` reuse the last run of that path.

    nohup python benchmarks/bench_workflow.py > benchmarks/.cache/workflow.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from bench_allocation import snakemake_command

from svnup.allocation import allocate
from svnup.calibration import dense_statistics, probe_masks
from svnup.config import model_settings
from svnup.data import calibration_samples
from svnup.evaluator import CoalitionEvaluator
from svnup.metrics import owl_outlier_ratio
from svnup.models import linear_layers, load_model
from svnup.perplexity import dataset_perplexity
from svnup.pruning import prune_model
from svnup.registry import ALLOCATIONS, method_params
from svnup.shapley import LeaveOneOut, SlidingWindow

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
CONFIG = HERE / "configs" / "c4-llama-12L.yaml"
MODEL = "c4-llama-12L"
LINKS = {"models": SHARED / "models", "data": SHARED / "data"}
VALUES: dict[str, Callable[[float, int], float]] = {
    "neg_nll": lambda nll_sum, n_tokens: -nll_sum / n_tokens,
    "neg_ppl": lambda nll_sum, n_tokens: -float(np.exp(nll_sum / n_tokens)),
}
IMPORTANCE = {"svnup": "SWSV Shapley", "loo": "leave-one-out", "owl": "OWL outlier density"}

Log = Callable[[str], None]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=HERE / ".cache" / "workflow")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--skip-workflow", action="store_true", help="reuse the last workflow run")
    p.add_argument("--skip-library", action="store_true", help="reuse the last library run")
    p.add_argument("--out", type=Path, default=HERE / "results" / "workflow.md")
    args = p.parse_args(argv)
    for path in LINKS.values():
        if not path.is_dir():
            p.error(f"{path} is missing; ../shared must sit beside the checkout")
    if args.cores < 1:
        p.error(f"--cores must be at least 1, got {args.cores}")
    args.workdir = args.workdir.resolve()
    return args


def prepare_workdir(workdir: Path, config_text: str) -> None:
    """Links to the fixtures and the config, so the config's relative paths resolve."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, target in LINKS.items():
        link = workdir / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link to {target}; remove it")
        link.symlink_to(target.resolve(), target_is_directory=True)
    (workdir / "config.yaml").write_text(config_text)


def _stored(path: Path, config_text: str, flag: str) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} is missing: no earlier run to reuse; drop {flag}")
    data = json.loads(path.read_text())
    if data["config"] != config_text:
        raise SystemExit(f"{path} was made with another config than {CONFIG}; drop {flag}")
    return data


def run_workflow(workdir: Path, cores: int, config_text: str, log: Log) -> dict:
    """Run snakemake from an empty results/ and token cache, so its time is the whole pipeline."""
    for folder in (workdir / "results", workdir / ".cache" / "tokens"):
        shutil.rmtree(folder, ignore_errors=True)
    command, env = snakemake_command(workdir, [f"results/{MODEL}/summary.csv"], cores)
    log_path = workdir / "snakemake.log"
    log(f"workflow: {shlex.join(command[1:])} (log: {log_path})")
    start = time.perf_counter()
    with log_path.open("w") as out:
        result = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed (exit {result.returncode}); see {log_path}")
    jobs = pd.concat(
        pd.read_csv(path, sep="\t")
        for path in (workdir / "results" / MODEL / "benchmarks").glob("**/*.tsv")
    )
    run = {
        "config": config_text,
        "command": shlex.join(["snakemake", *command[3:]]),
        "cores": cores,
        "seconds": seconds,
        "job_seconds": float(jobs["s"].sum()),
        "jobs": len(jobs),
    }
    (workdir / "workflow.json").write_text(json.dumps(run, indent=1))
    return run


def workflow_numbers(workdir: Path, config: dict) -> dict:
    """Perplexities, importances and block sparsities from the workflow's ppl.json files."""
    results = workdir / "results" / MODEL
    grid = config["targets"]
    dense = json.loads((results / "dense" / "ppl.json").read_text())
    numbers = {"dense": dense["perplexity"], "runs": {}, "importance": {}, "sparsities": {}}
    numbers["windows"] = {d: e["windows"] for d, e in dense["evaluations"].items()}
    for pruner in grid["pruners"]:
        for target in grid["sparsities"]:
            for allocation in grid["allocations"]:
                run = json.loads(
                    (results / f"s{target}/{allocation}/{pruner}/ppl.json").read_text()
                )
                key = f"{pruner}/{allocation}/s{target}"
                numbers["runs"][key] = run["perplexity"]
                numbers["sparsities"][key] = run["budget"]["sparsities"]
                if run["budget"]["importance"] is not None:
                    numbers["importance"][allocation] = run["budget"]["importance"]
    return numbers


def library_numbers(workdir: Path, config: dict, log: Log) -> tuple[dict, dict[str, float]]:
    """The same numbers in this process through the library API, with the workflow's settings."""
    torch.set_num_threads(1)
    s = model_settings(config, MODEL)
    shapley, budget = s["shapley"], s["allocation"]
    if shapley["estimator"] != "swsv":
        raise SystemExit(
            f"{CONFIG}: shapley.estimator must be swsv here, got {shapley['estimator']}"
        )
    cache = workdir / ".cache" / "library-tokens"
    shutil.rmtree(cache, ignore_errors=True)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock[0]
        clock[0] = now
        log(f"library: {name} done ({seconds[name]:.1f} s)")

    engine, tokenizer = load_model(
        workdir / s["path"], dtype=s["dtype"], device=s["device"], batch_size=s["batch_size"]
    )

    def perplexities() -> dict[str, float]:
        return {
            dataset: dataset_perplexity(
                engine,
                tokenizer,
                str(workdir / dataset),
                split=s["evaluation"]["split"],
                seqlen=s["seqlen"],
                cache_dir=cache,
            ).ppl
            for dataset in s["evaluation"]["datasets"]
        }

    numbers = {"dense": perplexities(), "runs": {}, "importance": {}, "sparsities": {}}
    lap("dense perplexity")
    calibration = s["calibration"]
    ids = calibration_samples(
        tokenizer,
        str(workdir / calibration["dataset"]),
        nsamples=calibration["nsamples"],
        seqlen=s["seqlen"],
        seed=calibration["seed"],
    )
    stats = dense_statistics(engine, ids)
    lap("calibration statistics")
    masks = probe_masks(engine, stats, shapley["probe_sparsity"], shapley["probe_pruner"])
    estimators = {
        "svnup": SlidingWindow(engine.n_blocks, shapley["window"], shapley["stride"]),
        "loo": LeaveOneOut(engine.n_blocks),
    }
    evaluator = CoalitionEvaluator(
        engine, ids[: shapley["eval_samples"]], shapley["ablation"], dict(enumerate(masks))
    )
    records: dict[int, tuple[float, int]] = {}
    wanted = set().union(*(e.coalitions() for e in estimators.values()))
    evaluator.evaluate(
        wanted, lambda mask, nll, tokens, _: records.__setitem__(mask, (nll, tokens))
    )
    value = VALUES[shapley["value"]]
    for name, estimator in estimators.items():
        result = estimator.estimate(lambda mask: value(*records[mask]))
        numbers["importance"][name] = result.values.tolist()
    numbers["importance"]["owl"] = [
        owl_outlier_ratio(
            {
                name: (layer.weight.data, stats[index][name])
                for name, layer in linear_layers(block).items()
            },
            method_params(budget, "owl")["m"],
        )
        for index, block in enumerate(engine.blocks)
    ]
    lap("probe masks, coalitions, OWL")
    params = np.asarray(engine.block_params(), dtype=np.float64)
    dense_weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    grid = config["targets"]
    for pruner in grid["pruners"]:
        for target in grid["sparsities"]:
            for allocation in grid["allocations"]:
                sparsities = _allocation(allocation, target, params, budget, numbers["importance"])
                try:
                    prune_model(engine, ids, sparsities.tolist(), method=pruner)
                    key = f"{pruner}/{allocation}/s{target}"
                    numbers["runs"][key] = perplexities()
                    numbers["sparsities"][key] = sparsities.tolist()
                finally:
                    engine.model.load_state_dict(dense_weights)
                lap("pruned runs")
    return numbers, seconds


def _allocation(method: str, target: float, params, budget: dict, importance: dict) -> np.ndarray:
    entry = ALLOCATIONS[method]
    values = method_params(budget, method)
    scores = None if entry.source is None else np.asarray(importance[method])
    return allocate(
        method,
        scores,
        params,
        target,
        (budget["min"], budget["max"]),
        **{name: values[name] for name in entry.mapping_params},
    )


def relative(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude; 0 when both are equal (also both 0)."""
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def _max_relative(a: list[float], b: list[float]) -> float:
    return max(relative(x, y) for x, y in zip(a, b, strict=True))


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list[str]:
    return [_row(*cells), _row(*("---" for _ in cells))]


def _diff(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def _setup(config: dict, windows: dict[str, int]) -> str:
    """One line with every setting that decides a number, read from the config."""
    s = model_settings(config, MODEL)
    cal, sh, al = s["calibration"], s["shapley"], s["allocation"]
    evaluation = ", ".join(f"{d} ({windows[d]} windows)" for d in s["evaluation"]["datasets"])
    return (
        f"- settings (`{CONFIG.relative_to(REPO)}`): {s['dtype']}, seqlen {s['seqlen']}, batch "
        f"{s['batch_size']}; calibration {cal['nsamples']} windows of {cal['dataset']} (seed "
        f"{cal['seed']}); {sh['estimator'].upper()} w={sh['window']} stride {sh['stride']} on the "
        f"first {sh['eval_samples']} of them, {sh['ablation']} ablation with a "
        f"{sh['probe_pruner']} probe at {sh['probe_sparsity']}, {sh['value']}; SV-NUP and LOO "
        f"lambda {method_params(al, 'svnup')['lambda']}, bounds [{al['min']}, {al['max']}]; OWL "
        f"M={method_params(al, 'owl')['m']:g} lambda {method_params(al, 'owl')['lambda']}; "
        f"evaluation: {evaluation}, split {s['evaluation']['split']}"
    )


def _finished(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def report(
    args: argparse.Namespace, command: str, config: dict, flow: dict, lib: dict
) -> list[str]:
    """The markdown page: setup, both paths' numbers side by side, differences, times."""
    wf, lb = flow["numbers"], lib["numbers"]
    datasets = list(wf["dense"])
    lines = [
        "# Workflow against library: c4-llama-12L",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load "
        f"average {os.getloadavg()[0]:.1f} now); snakemake --cores {flow['cores']}, every job and "
        f"the library path with 1 torch thread",
        f"- torch {torch.__version__}, transformers {metadata.version('transformers')}, "
        f"snakemake {metadata.version('snakemake')}, python {platform.python_version()}",
        _setup(config, wf["windows"]),
        f"- workflow: `{flow['command']}` in `{args.workdir}`, from an empty results/ and token "
        f"cache; library: the same settings through svnup.models, data, calibration, evaluator, "
        f"shapley, allocation, pruning and perplexity in one process",
        "- difference: |workflow - library| / max(|workflow|, |library|); 0 means bitwise equal",
        "",
        "## Perplexity",
        "",
    ]
    lines += _header("pruner", "allocation", "target", "dataset", "workflow", "library", "diff")
    worst = {"perplexity": 0.0}
    for dataset in datasets:
        a, b = wf["dense"][dataset], lb["dense"][dataset]
        worst["perplexity"] = max(worst["perplexity"], relative(a, b))
        lines.append(
            _row("-", "dense", "-", dataset, f"{a:.4f}", f"{b:.4f}", _diff(relative(a, b)))
        )
    for key, ppl in wf["runs"].items():
        pruner, allocation, target = key.split("/")
        for dataset in datasets:
            a, b = ppl[dataset], lb["runs"][key][dataset]
            worst["perplexity"] = max(worst["perplexity"], relative(a, b))
            lines.append(
                _row(
                    pruner,
                    allocation,
                    target[1:],
                    dataset,
                    f"{a:.4f}",
                    f"{b:.4f}",
                    _diff(relative(a, b)),
                )
            )
    lines += ["", "## Block importance", ""]
    names = list(IMPORTANCE)
    cells = [f"{IMPORTANCE[n]} ({side})" for n in names for side in ("workflow", "library")]
    lines += _header("block", *cells)
    for block in range(len(wf["importance"]["svnup"])):
        values = [f"{side['importance'][n][block]:.6f}" for n in names for side in (wf, lb)]
        lines.append(_row(block, *values))
    for name in names:
        worst[IMPORTANCE[name]] = _max_relative(wf["importance"][name], lb["importance"][name])
    worst["block sparsities"] = max(
        _max_relative(wf["sparsities"][k], lb["sparsities"][k]) for k in wf["sparsities"]
    )
    lines += ["", "## Largest relative difference", ""]
    lines += _header("quantity", "max relative difference")
    lines += [_row(name, _diff(value)) for name, value in worst.items()]
    lines += ["", "## Wall time", ""]
    lines += _header("path", "finished", "seconds", "detail")
    lines.append(
        _row(
            f"workflow (snakemake --cores {flow['cores']})",
            _finished(args.workdir / "workflow.json"),
            f"{flow['seconds']:.0f}",
            f"{flow['jobs']} jobs with benchmark files, {flow['job_seconds']:.0f} s summed",
        )
    )
    detail = ", ".join(f"{k} {v:.0f} s" for k, v in lib["seconds"].items())
    lines.append(
        _row(
            "library (one process, 1 thread)",
            _finished(args.workdir / "library.json"),
            f"{lib['total']:.0f}",
            detail,
        )
    )
    lines += [
        "",
        "A path passed over with --skip-workflow / --skip-library shows the numbers and times of "
        "its last run (finished at the time given); the two paths run one after the other.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench_workflow.py", *argv])])
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    config_text = CONFIG.read_text()
    config = yaml.safe_load(config_text)
    prepare_workdir(args.workdir, config_text)
    if args.skip_workflow:
        flow = _stored(args.workdir / "workflow.json", config_text, "--skip-workflow")
    else:
        flow = run_workflow(args.workdir, args.cores, config_text, log)
        log(f"workflow: finished in {flow['seconds']:.0f} s")
    flow["numbers"] = workflow_numbers(args.workdir, config)
    library_file = args.workdir / "library.json"
    if args.skip_library:
        lib = _stored(library_file, config_text, "--skip-library")
    else:
        start = time.perf_counter()
        numbers, seconds = library_numbers(args.workdir, config, log)
        lib = {
            "config": config_text,
            "numbers": numbers,
            "seconds": seconds,
            "total": time.perf_counter() - start,
        }
        library_file.write_text(json.dumps(lib, indent=1))
        log(f"library: finished in {lib['total']:.0f} s")
    lines = report(args, command, config, flow, lib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines), flush=True)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
