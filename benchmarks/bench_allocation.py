"""Allocation study: every allocation method x {Wanda, SparseGPT} through the workflow.

Why: svnup's claim is that its recommended allocation beats every allocation a user could pick
instead (uniform, OWL, DLP, ATP, AlphaPruning, leave-one-out, the paper's SV-NUP), on a real
pretrained model and at a cost comparable to pruning itself. The study runs the real pipeline
(``snakemake``) on the configs in ``benchmarks/configs/allocation-<model>.yaml`` so that every
number is what a user gets, then tabulates perplexity per (pruner, target, method), the per-block
allocations, and each method's scoring cost in CPU seconds relative to one SparseGPT pruning pass
on the same calibration set, all from the same run. Beside each table, ``<table>.budgets.json``
keeps every cell's perplexity and budget file (per block and, where set, per linear layer).

The working directory (``benchmarks/.cache/allocation``) links ``data`` to ``../shared/data`` and
``models/c4-llama-12L`` to the fixture, converts smollm2-135m from its GGUF into
``models/smollm2-135m`` once (``../shared/tools/gguf_to_hf.py``; needs ``pip install gguf
accelerate``), and writes the calibration file of the first 1,600 C4 documents. Variants that
change a shared setting (the Shapley estimator) run in a sibling directory of their own.

    python benchmarks/bench_allocation.py --model smollm2-135m              # study, 64 windows
    python benchmarks/bench_allocation.py --model smollm2-135m --windows 0  # all 595 windows
    python benchmarks/bench_allocation.py --model c4-llama-12L
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from svnup import config as cfg
from svnup.registry import ALLOCATIONS, method_params

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
C4 = SHARED / "data" / "c4" / "c4-validation-2k.jsonl"
SMOLLM_GGUF = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_DOCS = 1600
# Study variants: (label, allocation method, config overrides run in a directory of their own)
VARIANTS = {
    "svnup-swsv": ("svnup", {"shapley": {"estimator": "swsv"}}),
    "svnup-permutation": ("svnup", {"shapley": {"estimator": "permutation"}}),
    "svnup-fit-sparsegpt": ("svnup-fit", {"shapley": {"probe_pruner": "sparsegpt"}}),
    "svnup-fit-swsv": ("svnup-fit", {"shapley": {"estimator": "swsv"}}),
    "svnup-fit-kl": ("svnup-fit", {"shapley": {"targets": "dense"}}),
    "svnup-fit-kl-sparsegpt": (
        "svnup-fit",
        {"shapley": {"targets": "dense", "probe_pruner": "sparsegpt"}},
    ),
    "svnup-fit-halves": ("svnup-fit", {"shapley": {"players": "halves", "probe_pruner": "match"}}),
    "svnup-fit-halves-kl": (
        "svnup-fit",
        {"shapley": {"players": "halves", "probe_pruner": "match", "targets": "dense"}},
    ),
    "svnup-fit-layers": ("svnup-fit", {"shapley": {"players": "layers", "probe_pruner": "match"}}),
    # the halves split between their linear layers by the type game (docs/methods.md)
    "svnup-fit-halves-types": (
        "svnup-fit",
        {
            "shapley": {"players": "halves", "probe_pruner": "match"},
            "allocation": {"svnup-fit": {"split": "types"}},
        },
    ),
    # no coalition games: every half at the target, split by the type game alone
    "svnup-types": ("svnup-types", {"shapley": {"probe_pruner": "match"}}),
    "lsa-projection": ("lsa", {"allocation": {"lsa": {"granularity": "projection"}}}),
    # the level database pruned by each run's pruner instead of SparseGPT (the reference's)
    "evopress-match": ("evopress", {"allocation": {"evopress": {"probe_pruner": "match"}}}),
    # the search starts where svnup-fit's games end: its folder plays them too (a search input)
    # seeded by the recommended SV-NUP-fit (halves, games probed by the search's pruner)
    "evopress-seeded": (
        "evopress",
        {
            "allocation": {"evopress": {"start": "svnup-fit"}},
            "shapley": {"players": "halves", "probe_pruner": "match"},
        },
    ),
    # seeded by the best setting svnup ships (halves split by the type game), searching on each
    # pruner's own level database
    "evopress-seeded-types": (
        "evopress",
        {
            "allocation": {
                "evopress": {"start": "svnup-fit", "probe_pruner": "match"},
                "svnup-fit": {"split": "types"},
            },
            "shapley": {"players": "halves", "probe_pruner": "match"},
        },
    ),
}
# A seeded search's folder plays its seed's games anyway: it also evaluates the seed, tabulated
# under the seed's variant label where that variant is not run in a folder of its own.
SEEDS = {"evopress-seeded-types": "svnup-fit-halves-types"}
# The recommended allocation (README "Allocation on real models"): SV-NUP-fit on half-block players,
# each pruner's games probed with that pruner. Where that variant did not run, the block games with
# the matched probe: the config's method, or for a pruner whose probe is not the config's this.
RECOMMENDED = "svnup-fit-halves"
MATCHED_PROBE = {"sparsegpt": "svnup-fit-sparsegpt"}
NAMES = {
    "uniform": "uniform",
    "owl": "OWL",
    "dlp": "DLP",
    "alphapruning": "AlphaPruning",
    "atp": "ATP",
    "evopress": "EvoPress",
    "lsa": "LSA",
    "loo": "LOO",
    "svnup": "SV-NUP",
    "svnup-swsv": "SV-NUP (SWSV)",
    "svnup-fit": "SV-NUP-fit",
    "svnup-permutation": "SV-NUP (permutation)",
    "svnup-fit-sparsegpt": "SV-NUP-fit (SparseGPT probe)",
    "svnup-fit-swsv": "SV-NUP-fit (SWSV games)",
    "svnup-fit-kl": "SV-NUP-fit (KL games)",
    "svnup-fit-kl-sparsegpt": "SV-NUP-fit (KL games, SparseGPT probe)",
    "svnup-fit-halves": "SV-NUP-fit (halves, matched probe)",
    "svnup-fit-halves-kl": "SV-NUP-fit (halves, KL games, matched probe)",
    "svnup-fit-layers": "SV-NUP-fit (linear layers, matched probe)",
    "svnup-fit-halves-types": "SV-NUP-fit (halves split by the type game, matched probe)",
    "svnup-types": "svnup-types (halves at the target split by the type game, matched probe)",
    "lsa-projection": "LSA (by projection)",
    "evopress-seeded": "EvoPress seeded by SV-NUP-fit (halves)",
    "evopress-match": "EvoPress (level database of the run's pruner)",
    "evopress-seeded-types": "EvoPress seeded by SV-NUP-fit (halves split by the type game)",
}
# Methods that search once per target (ATP, and EvoPress on each pruner's database, also once per
# pruner); EvoPress's cost includes its level database.
PER_TARGET = {
    "atp": "once per target and pruner",
    "evopress": "once per target",
    "evopress-match": "once per target and pruner",
    "evopress-seeded-types": "once per target and pruner",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=["smollm2-135m", "c4-llama-12L"])
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help="WikiText-2 test windows evaluated (0: all; default: the config's)",
    )
    p.add_argument(
        "--evopress-generations",
        type=int,
        default=None,
        help="instead of the config's allocation.evopress.generations (a longer search continues "
        "the finished shorter one in the same folder)",
    )
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores (1 thread per job)")
    p.add_argument("--pruners", nargs="+", help="a subset of the config's targets.pruners")
    p.add_argument("--sparsities", nargs="+", type=float, help="instead of targets.sparsities")
    p.add_argument("--allocations", nargs="+", help="a subset of targets.allocations")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--only-run",
        nargs="+",
        metavar="LABEL",
        help="run the workflow only in these folders ('main' and variant labels) and read the "
        "others' runs as they stand (they must hold every cell, evaluated on the same windows, "
        "which is checked before anything runs); "
        "default: all",
    )
    p.add_argument("--workdir", type=Path, default=HERE / ".cache" / "allocation")
    p.add_argument("--out", type=Path, default=None, help="default: results/allocation-<model>.md")
    args = p.parse_args(argv)
    for path in (SHARED / "data", C4):
        if not path.exists():
            p.error(f"{path} is missing; ../shared must sit beside the checkout")
    args.workdir = args.workdir.resolve()
    if args.out is None:
        narrowed = [
            f"--{name.replace('_', '-')}"
            for name in ("pruners", "sparsities", "allocations", "evopress_generations", "only_run")
            if getattr(args, name) is not None
        ]
        if args.variants != list(VARIANTS):
            narrowed.append("--variants")
        if narrowed:  # the default file is the committed table of the config's whole grid
            p.error(f"{' '.join(narrowed)} narrow the grid: pass --out for its table")
        suffix = "" if args.windows is None else f"-{args.windows or 'all'}-windows"
        args.out = HERE / "results" / f"allocation-{args.model}{suffix}.md"
    return args


def _cpu() -> str:
    """The CPU's model name and the vector kernels torch picks on it: a SparseGPT-pruned
    perplexity moves by about 2% between kernel sets (docs/results.md), so a table says which."""
    import torch

    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() or link.is_symlink():
        raise SystemExit(f"{link} exists and is not a link to {target}; remove it")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def _smollm2_checkpoint(target: Path, converted: Path | None) -> None:
    """The float32 conversion of the GGUF fixture at ``target``. A variant's folder takes the
    main folder's (``converted``) as hard links, or copies that keep its modification times: a
    large weights file is fingerprinted by its size and mtime (svnup.content), so a conversion of
    its own would key the dense model's runs apart and ``share_dense`` would share nothing."""
    if (target / "config.json").exists():
        return
    if converted is not None and (converted / "config.json").exists():
        partial = target.with_name(f".{target.name}.partial")  # a killed copy is no checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(converted, partial, copy_function=_link_or_copy)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return
    command = [
        sys.executable,
        str(SHARED / "tools" / "gguf_to_hf.py"),
        str(SMOLLM_GGUF),
        str(target),
    ]
    print(f"converting the GGUF fixture: {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


def prepare(workdir: Path, model: str, checkpoint_from: Path | None = None) -> None:
    """Fixture links, the converted smollm2 checkpoint (``checkpoint_from``'s where given) and the
    calibration documents."""
    workdir.mkdir(parents=True, exist_ok=True)
    _link(workdir / "data", SHARED / "data")
    models = workdir / "models"
    models.mkdir(exist_ok=True)
    if model == "c4-llama-12L":
        _link(models / model, SHARED / "models" / model)
    else:
        converted = checkpoint_from / "models" / model if checkpoint_from else None
        _smollm2_checkpoint(models / model, converted)
    calib = workdir / "calib" / f"c4-first-{CALIBRATION_DOCS}.jsonl"
    if not calib.exists():
        calib.parent.mkdir(exist_ok=True)
        with C4.open() as source:
            lines = [next(source) for _ in range(CALIBRATION_DOCS)]
        calib.write_text("".join(lines))


def share_dense(source: Path, folder: Path, model: str) -> None:
    """Copy the dense model's evaluations from the main folder into a variant's. They are keyed by
    content (the model and the evaluation spec), so they are the same in every folder, and at full
    WikiText-2 length each costs as much as a pruned run's evaluation."""
    dense = source / "results" / model / "runs" / "dense"
    for path in dense.rglob("*.json"):
        target = folder / path.relative_to(source)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


def snakemake_command(workdir: Path, targets: list[str], cores: int) -> tuple[list[str], dict]:
    """The command and environment that run the repository's workflow on ``workdir``'s
    config.yaml, with the interpreter's snakemake and a token cache inside ``workdir``."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        *targets,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        # Outputs are keyed by the content of their specs; a rule's shell text changing with
        # svnup's code (a new optional flag) must not re-run a study's finished searches.
        "--rerun-triggers",
        "mtime",
        "params",
        "input",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["SVNUP_CACHE"] = str(workdir / ".cache" / "tokens")
    return command, env


def run_snakemake(workdir: Path, config: dict, targets: list[str], cores: int) -> float:
    """Run the workflow on ``config`` in ``workdir``; returns its wall time."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command, env = snakemake_command(workdir, targets, cores)
    log = workdir / "snakemake.log"
    print(f"snakemake in {workdir} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("a") as out:
        result = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def check_readable(
    label: str, folder: Path, model: str, settings: dict, reference: str | None
) -> None:
    """Exit unless ``folder``, which ``--only-run`` leaves to be read, holds every evaluation the
    table reads from it: one per (target, allocation, pruner) of ``settings``' grid, and the cost
    reference where it is the main folder."""
    grid = settings["targets"]
    cells = [
        _cell(folder, model, target, method, pruner)
        for target in grid["sparsities"]
        for method in grid["allocations"]
        for pruner in grid["pruners"]
    ] + ([] if reference is None else [folder / reference])
    if missing := [cell for cell in cells if not cell.exists()]:
        raise SystemExit(
            f"--only-run leaves {label} to be read, but {missing[0]} is missing ({len(missing)}"
            f" of its {len(cells)} runs): add {label} to --only-run"
        )


def _cell(folder: Path, model: str, target: float, method: str, pruner: str) -> Path:
    return folder / f"results/{model}/s{target}/{method}/{pruner}/ppl.json"


def _run(folder: Path, model: str, target: float, method: str, pruner: str) -> dict:
    return json.loads(_cell(folder, model, target, method, pruner).read_text())


def run_budget(folder: Path, model: str, method: str, run: dict) -> dict:
    """The budget file a run was pruned with, whole: what ``python -m svnup prune --budget``
    reads (the run's JSON keeps only part of it)."""
    key = cfg.key(run["budget"]["spec"])
    target = run["target_sparsity"]
    return json.loads(
        (folder / f"results/{model}/budget/{method}/{key}/s{target}.json").read_text()
    )


def probe_seconds(folder: Path, settings: dict, model: str, method: str, pruner: str) -> float:
    """Seconds of the probe jobs whose probes ``method``'s games for ``pruner``'s runs ablate
    with (SparseGPT probes cost a pruning kernel per layer and level; mask probes a few
    seconds)."""
    source = ALLOCATIONS[method].source
    if source is None or source.kind not in ("shapley", *cfg.LEVELLED):
        return 0.0
    if settings["shapley"]["ablation"] != "prune":
        return 0.0
    settings = cfg.for_pruner(settings, pruner)
    if source.kind in cfg.LEVELLED:
        levels = method_params(settings["allocation"], method)["levels"]
    else:
        levels = [settings["shapley"]["probe_sparsity"]]
    total = 0.0
    with contextlib.chdir(folder):  # the spec fingerprints the model at its workflow path
        for level in levels:
            probe = cfg.key(cfg.probe_spec(cfg.at_probe(settings, level)))
            tsv = Path(f"results/{model}/benchmarks/probe/{probe}.tsv")
            total += float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])
    return total


def level_seconds(folder: Path, model: str, method: str, target: float) -> float:
    """Seconds of the level database that ``method``'s search at ``target`` reads (EvoPress's)."""
    records = sorted(folder.glob(f"results/{model}/benchmarks/levels/{method}/*/s{target}.tsv"))
    return sum(float(pd.read_csv(tsv, sep="\t")["s"].iloc[0]) for tsv in records)


def start_cost(folder: Path, settings: dict, model: str, method: str, pruner: str, target) -> tuple:
    """(seconds, coalitions) of the allocation a search of ``method`` starts from (EvoPress's
    start: svnup-fit): its games and probes, which a seeded search's cost includes."""
    start = cfg.search_start(settings, method, pruner)
    if start is None:
        return 0.0, 0
    with contextlib.chdir(folder):
        key = cfg.key(cfg.budget_spec(settings, *start))
    budget = json.loads(
        (folder / f"results/{model}/budget/{start[0]}/{key}/s{target}.json").read_text()
    )
    scores = budget["scores"]
    probes = probe_seconds(folder, settings, model, start[0], start[1])
    return (scores["seconds"] or 0.0) + probes, scores["n_coalitions"] or 0


def collect(args: argparse.Namespace, config: dict, folders: dict[str, tuple[Path, dict]]) -> dict:
    grid, model = config["targets"], args.model
    rows, allocations, budgets = [], {}, {}
    for label, (folder, folder_config) in folders.items():
        method = VARIANTS[label][0] if label in VARIANTS else label
        settings = cfg.model_settings(folder_config, model)
        for pruner in grid["pruners"]:
            probes = probe_seconds(folder, settings, model, method, pruner)
            for target in grid["sparsities"]:
                run = _run(folder, model, target, method, pruner)
                database = level_seconds(folder, model, method, target)
                seeded, seed_coalitions = start_cost(
                    folder, settings, model, method, pruner, target
                )
                ((dataset, ppl),) = run["perplexity"].items()
                rows.append(
                    {
                        "method": label,
                        "pruner": pruner,
                        "target": target,
                        "ppl": ppl,
                        "windows": run["evaluations"][dataset]["windows"],
                        "prune_seconds": run["pruning"]["seconds"],
                        "coalitions": (run["budget"]["scores"]["n_coalitions"] or 0)
                        + seed_coalitions,
                        "seconds": (run["budget"]["scores"]["seconds"] or 0.0)
                        + probes
                        + database
                        + seeded,
                    }
                )
                allocations[(label, pruner, target)] = run["budget"]["sparsities"]
                budgets[f"{label}/{pruner}/s{target}"] = {
                    "ppl": ppl,
                    "budget": run_budget(folder, model, method, run),
                }
    mixed = pd.DataFrame(rows).groupby("windows")["method"].unique()
    if len(mixed) > 1:
        raise SystemExit(
            "the folders' runs were evaluated on different windows ("
            + "; ".join(f"{n}: {', '.join(m)}" for n, m in mixed.items())
            + "); run them again (leave out --only-run)"
        )
    return {
        "rows": pd.DataFrame(rows),
        "allocations": allocations,
        "budgets": budgets,
        "dense": dense_perplexity(args.workdir, model, rows[0]["windows"]),
    }


def dense_perplexity(workdir: Path, model: str, windows: int) -> float:
    """The dense model's perplexity on the windows the runs were evaluated on (the main folder
    keeps the dense evaluation of every window count it ran)."""
    for path in sorted(workdir.glob(f"results/{model}/runs/dense/*/eval/*.json")):
        evaluation = json.loads(path.read_text())
        if evaluation["windows"] == windows:
            return evaluation["ppl"]
    raise SystemExit(
        f"no dense evaluation on {windows} windows in {workdir}; run without --only-run"
    )


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list[str]:
    return [_row(*cells), _row(*("---" for _ in cells))]


def report(args: argparse.Namespace, config: dict, numbers: dict, wall: dict) -> list[str]:
    table: pd.DataFrame = numbers["rows"]
    s = cfg.model_settings(config, args.model)
    grid = config["targets"]
    no_game = {"uniform", "owl", "dlp", "alphapruning", "atp"}
    command = shlex.join(["python", "benchmarks/bench_allocation.py", *sys.argv[1:]])
    windows = int(table["windows"].iloc[0])
    lines = [
        f"# Allocation study: {args.model}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} ({_cpu()}), {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f} at the end); snakemake --cores {args.cores}, 1 torch thread "
        "per job",
        f"- svnup {metadata.version('svnup')}, torch {metadata.version('torch')}, transformers "
        f"{metadata.version('transformers')}, snakemake {metadata.version('snakemake')}",
        f"- config: `benchmarks/configs/allocation-{args.model}.yaml` (seqlen {s['seqlen']}, "
        f"{s['calibration']['nsamples']} calibration windows of the first {CALIBRATION_DOCS} C4 "
        f"documents, seed {s['calibration']['seed']}; Shapley evaluation set: the first "
        f"{s['shapley']['eval_samples']} of them); variants: "
        + ", ".join(f"{k}: {v[1]}" for k, v in VARIANTS.items() if k in args.variants),
        f"- evaluation: WikiText-2 test, the first {windows} windows of {s['seqlen']} tokens; "
        f"dense perplexity {numbers['dense']:.2f}",
        f"- wall time of this invocation: {sum(wall.values()):.0f} s"
        + ("" if args.only_run is None else f" (workflow run in: {', '.join(args.only_run)})"),
        "",
        "## Perplexity",
        "",
        "Best per column in bold; the last row of each pruner is the recommended method "
        f"({NAMES[RECOMMENDED]} where that variant ran; otherwise the block games, probed with "
        "the pruner itself where that variant ran) against the best method that plays no "
        "coalition game (" + ", ".join(sorted(no_game)) + ").",
        "",
    ]
    methods = list(dict.fromkeys(table["method"]))
    for pruner in grid["pruners"]:
        lines += _header(pruner, *(f"{t:.0%}" for t in grid["sparsities"]))
        sub = table[table["pruner"] == pruner]
        best = sub.groupby("target")["ppl"].min()
        for method in methods:
            cells = []
            for target in grid["sparsities"]:
                ppl = float(
                    sub[(sub["method"] == method) & (sub["target"] == target)]["ppl"].iloc[0]
                )
                text = f"{ppl:.2f}"
                cells.append(f"**{text}**" if ppl == best[target] else text)
            lines.append(_row(NAMES.get(method, method), *cells))
        recommended = RECOMMENDED if RECOMMENDED in methods else MATCHED_PROBE.get(pruner)
        if recommended not in methods:
            recommended = s["allocation"]["method"]
        if recommended in methods:  # a study of no-game methods only has no such row
            changes = []
            for target in grid["sparsities"]:
                at = sub[sub["target"] == target]
                ours = float(at[at["method"] == recommended]["ppl"].iloc[0])
                rival = at[at["method"].isin(no_game)].sort_values("ppl").iloc[0]
                changes.append(f"{ours / rival['ppl'] - 1:+.1%} vs {NAMES[rival['method']]}")
            lines.append(_row(f"{NAMES.get(recommended, recommended)} vs best no-game", *changes))
        lines.append("")
    lines += [
        "## Cost of each method's scores",
        "",
        "Seconds as recorded by the stage that computes the scores (for the Shapley estimators "
        "the coalition seconds, counting only the coalitions each estimator needs, so a coalition "
        "shared with another estimator counts for both, plus the probe jobs its games use), "
        "against the seconds of one SparseGPT pruning pass at the first target (`prune.json`), "
        "one thread each. A stage taken from the cache keeps the seconds of the run that "
        "computed it.",
        "",
    ]
    reference = numbers["reference_seconds"]
    shown = grid["pruners"][0]  # the pruner whose per-block sparsities are listed
    lines += _header("method", "coalitions", "seconds", "x SparseGPT pass", "computed")
    for method in methods:
        runs = table[table["method"] == method]
        searched = VARIANTS[method][0] if method in VARIANTS else method
        per_run = PER_TARGET.get(method, PER_TARGET.get(searched, "once"))
        seconds = runs["seconds"].mean() if searched in PER_TARGET else runs["seconds"].max()
        lines.append(
            _row(
                NAMES.get(method, method),
                int(runs["coalitions"].max()),
                f"{seconds:.0f}",
                f"{seconds / reference:.2f}",
                per_run,
            )
        )
    lines += [
        "",
        f"One SparseGPT pass: {reference:.0f} s. ATP searches for every target and pruner, "
        "EvoPress for every target (its level database included); their rows are the mean "
        "search. The other scores are computed once and reused for every target and pruner.",
        "",
        f"## Per-block sparsity at the middle target ({shown})",
        "",
    ]
    middle = grid["sparsities"][len(grid["sparsities"]) // 2]
    lines += _header("block", *(NAMES.get(m, m) for m in methods))
    n_blocks = len(numbers["allocations"][(methods[0], shown, middle)])
    for block in range(n_blocks):
        cells = [f"{numbers['allocations'][(m, shown, middle)][block]:.3f}" for m in methods]
        lines.append(_row(block, *cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    config = yaml.safe_load((HERE / "configs" / f"allocation-{args.model}.yaml").read_text())
    if args.windows is not None:
        config["evaluation"]["windows"] = args.windows or None
    if args.evopress_generations is not None:
        config["allocation"]["evopress"]["generations"] = args.evopress_generations
    grid = config["targets"]
    for key in ("pruners", "sparsities", "allocations"):
        chosen = getattr(args, key)
        if chosen and key != "sparsities" and not set(chosen) <= set(grid[key]):
            raise SystemExit(f"--{key} {chosen}: choose from the config's {grid[key]}")
        grid[key] = chosen or grid[key]
    cfg.validate(config)
    folders, wall = {}, {}
    # The cost reference: one uniform SparseGPT pass at the first target, run even when the
    # study's pruners leave SparseGPT out.
    reference = f"results/{args.model}/s{grid['sparsities'][0]}/uniform/sparsegpt/ppl.json"
    targets = [f"results/{args.model}/summary.csv", reference]

    plan = {"main": (args.workdir, config, targets)}
    for label in args.variants:
        method, override = VARIANTS[label]
        variant = _merge(config, override)
        evaluated = [method]
        if (seed := SEEDS.get(label)) is not None and seed not in args.variants:
            evaluated.append(VARIANTS[seed][0])
        variant["targets"] = {**config["targets"], "allocations": evaluated}
        plan[label] = (args.workdir.with_name(f"{args.workdir.name}-{label}"), variant, targets[:1])
    running = list(plan) if args.only_run is None else args.only_run
    if unknown := sorted(set(running) - set(plan)):
        raise SystemExit(f"--only-run {' '.join(unknown)}: not main or one of --variants")
    for label in plan:
        if label not in running:  # fail in seconds, not after the other folders' searches
            folder, settings, _ = plan[label]
            check_readable(
                label, folder, args.model, settings, reference if label == "main" else None
            )
    for label, (folder, settings, folder_targets) in plan.items():
        if label in running:
            prepare(folder, args.model, None if label == "main" else args.workdir)
            if label != "main":
                share_dense(args.workdir, folder, args.model)
            wall[label] = run_snakemake(folder, settings, folder_targets, args.cores)
    for label, (folder, settings, _) in plan.items():
        for method in settings["targets"]["allocations"] if label == "main" else [label]:
            folders[method] = (folder, settings)
        if label in SEEDS and SEEDS[label] not in args.variants:
            folders[SEEDS[label]] = (folder, settings)
    numbers = collect(args, config, folders)
    numbers["reference_seconds"] = json.loads((args.workdir / reference).read_text())["pruning"][
        "seconds"
    ]
    lines = report(args, config, numbers, wall)
    args.out.write_text("\n".join(lines) + "\n")
    # Every cell's budget file (per block, and per linear layer where the method sets them), so a
    # cell can be pruned again on another machine (`python -m svnup prune --budget`) once the
    # folder that searched it is gone.
    budgets = args.out.with_suffix(".budgets.json")
    budgets.write_text(json.dumps(numbers["budgets"], indent=1) + "\n")
    print(f"wrote {args.out} and {budgets.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
