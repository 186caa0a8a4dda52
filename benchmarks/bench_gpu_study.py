"""The smollm2-135m allocation study at full WikiText-2 length, every cell pruned and evaluated on
one GPU.

Why: on two CPU cores one full-length cell (prune, then 595 windows of 512 tokens) costs about 20
CPU-minutes, so the CPU study evaluates its table on the first 64 windows and only the cells that
decide the 5% question at full length. A GPU runs all of them in minutes. The allocations are not
recomputed there: each cell's per-block sparsities are read from the ``ppl.json`` the CPU study
wrote (an allocation does not depend on the evaluation length), and the GPU prunes and evaluates
with the code of the ``prune`` and ``evaluate`` stages (``prune_model``, ``stream_perplexity``),
restoring the dense weights between cells instead of writing checkpoints. Each cell is also
evaluated on the first 64 windows, to compare with the CPU table cell by cell.

    python benchmarks/bench_gpu_study.py cells --cache benchmarks/.cache --out cells.json
    python benchmarks/bench_gpu_study.py run --cells cells.json --model-dir MODEL \
        --calibration calibration.h5 --dataset test.jsonl --device cuda --workers 6 --out study.json
    python benchmarks/bench_gpu_study.py report --results study.json \
        --out benchmarks/results/allocation-smollm2-135m-gpu.md

``cells`` runs where the CPU study's cache is, ``run`` on the GPU machine (it needs only torch,
transformers, h5py and svnup), ``report`` anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

MODEL = "smollm2-135m"
SEQLEN = 512
SHORT_WINDOWS = 64
SPARSITIES = (0.4, 0.5, 0.6)
PRUNERS = ("wanda", "sparsegpt")
# (row, the bench_allocation cache folder, the allocation name in it), in table order
ROWS = (
    ("uniform", "allocation", "uniform"),
    ("OWL", "allocation", "owl"),
    ("DLP", "allocation", "dlp"),
    ("AlphaPruning", "allocation", "alphapruning"),
    ("ATP", "allocation", "atp"),
    ("LOO", "allocation", "loo"),
    ("SV-NUP-fit", "allocation", "svnup-fit"),
    ("SV-NUP (SWSV)", "allocation-svnup-swsv", "svnup"),
    ("SV-NUP-fit (SparseGPT probe)", "allocation-svnup-fit-sparsegpt", "svnup-fit"),
    ("SV-NUP (permutation)", "allocation-svnup-permutation", "svnup"),
    ("SV-NUP-fit, KL games", "allocation-svnup-fit-kl", "svnup-fit"),
    ("SV-NUP-fit, KL games (SparseGPT probe)", "allocation-svnup-fit-kl-sparsegpt", "svnup-fit"),
)
NO_GAME = ("uniform", "OWL", "DLP", "AlphaPruning", "ATP")
RECOMMENDED = {"wanda": "SV-NUP-fit", "sparsegpt": "SV-NUP-fit (SparseGPT probe)"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    cells = sub.add_parser("cells", help="collect the study's budgets from the CPU cache")
    cells.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    cells.add_argument("--out", type=Path, required=True)
    for name in ("run", "worker"):
        run = sub.add_parser(name, help="prune and evaluate the cells" if name == "run" else None)
        run.add_argument("--cells", type=Path, required=True)
        run.add_argument("--model-dir", required=True)
        run.add_argument("--calibration", type=Path, required=True)
        run.add_argument("--dataset", required=True, help="WikiText-2 test (a jsonl file)")
        run.add_argument("--device", default="cuda")
        run.add_argument("--seqlen", type=int, default=SEQLEN)
        run.add_argument("--short-windows", type=int, default=SHORT_WINDOWS)
        run.add_argument("--batch-size", type=int, default=16)
        run.add_argument("--threads", type=int, default=2, help="torch threads per worker")
        run.add_argument("--work-dir", type=Path, default=Path("gpu-study-work"))
        if name == "run":
            run.add_argument("--workers", type=int, default=1)
            run.add_argument("--deadline", type=float, default=None, help="stop after S seconds")
            run.add_argument("--out", type=Path, required=True)
        else:
            run.add_argument("--shard", type=int, required=True)
            run.add_argument("--of", type=int, required=True)
    report = sub.add_parser("report", help="the markdown tables of a run")
    report.add_argument("--results", type=Path, required=True)
    report.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def collect_cells(cache: Path) -> list[dict]:
    """One cell per (row, pruner, sparsity) whose ppl.json the CPU study wrote; the dense model
    first, then the 50% and 60% columns (the ones the 5% goal names), then 40%."""
    cells = [{"id": "dense", "row": "dense", "pruner": None, "sparsity": 0.0, "sparsities": None}]
    found = []
    for order, (row, folder, allocation) in enumerate(ROWS):
        for sparsity in SPARSITIES:
            for pruner in PRUNERS:
                path = cache / folder / "results" / MODEL / f"s{sparsity}" / allocation / pruner
                if not (path / "ppl.json").exists():
                    print(f"skipped (not in the cache): {path}/ppl.json", file=sys.stderr)
                    continue
                record = json.loads((path / "ppl.json").read_text())
                (evaluation,) = record["evaluations"].values()
                cell = {
                    "id": f"{folder}/{allocation}/s{sparsity}/{pruner}",
                    "row": row,
                    "pruner": pruner,
                    "sparsity": sparsity,
                    "sparsities": record["budget"]["sparsities"],
                    "cpu": {"windows": evaluation["windows"], "ppl": evaluation["ppl"]},
                }
                found.append(((sparsity == SPARSITIES[0], order), cell))
    found.sort(key=lambda pair: pair[0])  # stable: pruners and targets keep their order
    return cells + [cell for _, cell in found]


def _cell_file(work_dir: Path, cell: dict) -> Path:
    """Where a worker writes a finished cell (its presence is what makes a run resume)."""
    return work_dir / f"{cell['id'].replace('/', '__')}.json"


def _worker(args: argparse.Namespace) -> None:
    """Prune and evaluate every ``of``-th cell, from the dense weights each time."""
    import torch

    from svnup.calibration import load_statistics
    from svnup.data import eval_stream
    from svnup.io import write_json
    from svnup.models import load_model
    from svnup.perplexity import stream_perplexity
    from svnup.pruning import prune_model

    torch.set_num_threads(args.threads)
    cells = json.loads(args.cells.read_text())[args.shard :: args.of]
    engine, tokenizer = load_model(
        args.model_dir, device=args.device, offload=False, batch_size=args.batch_size
    )
    ids = load_statistics(args.calibration)[0]
    stream = eval_stream(tokenizer, args.dataset, split="test", seqlen=args.seqlen)
    dense = {name: tensor.detach().clone() for name, tensor in engine.model.state_dict().items()}
    for cell in cells:
        done = _cell_file(args.work_dir, cell)
        if done.exists():
            continue
        engine.model.load_state_dict(dense)
        start = time.perf_counter()
        if cell["sparsities"] is not None:
            prune_model(engine, ids, cell["sparsities"], method=cell["pruner"])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        pruned = time.perf_counter()
        short = stream_perplexity(
            engine, stream[:, : args.short_windows * args.seqlen], args.seqlen
        )
        full = stream_perplexity(engine, stream, args.seqlen)
        evaluated = time.perf_counter()
        write_json(
            done,
            {
                **cell,
                "ppl": {str(short.windows): short.ppl, str(full.windows): full.ppl},
                "tokens": full.tokens,
                "prune_seconds": pruned - start,
                "evaluate_seconds": evaluated - pruned,
            },
        )
        print(f"{cell['id']}: {full.ppl:.3f} ({evaluated - start:.1f} s)", flush=True)


def _environment(device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _gather(work_dir: Path, cells: list[dict]) -> list[dict]:
    files = [_cell_file(work_dir, cell) for cell in cells]
    return [json.loads(path.read_text()) for path in files if path.exists()]


def run(args: argparse.Namespace) -> int:
    """Start the workers, and keep ``--out`` up to date with the finished cells (so a run stopped
    at its deadline still returns what it measured)."""
    from svnup.io import write_json

    args.work_dir.mkdir(parents=True, exist_ok=True)
    cells = json.loads(args.cells.read_text())
    common = [
        *("--cells", args.cells, "--model-dir", args.model_dir, "--calibration", args.calibration),
        *("--dataset", args.dataset, "--device", args.device, "--work-dir", args.work_dir),
        *("--batch-size", args.batch_size, "--threads", args.threads),
        *("--seqlen", args.seqlen, "--short-windows", args.short_windows),
    ]
    start = time.perf_counter()
    workers = []
    for shard in range(args.workers):
        command = [sys.executable, __file__, "worker", *map(str, common)]
        command += ["--shard", str(shard), "--of", str(args.workers)]
        with open(args.work_dir / f"worker-{shard}.log", "a") as log:  # the child keeps it open
            workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    environment = _environment(args.device)
    while True:
        running = [w for w in workers if w.poll() is None]
        elapsed = time.perf_counter() - start
        stopped = args.deadline is not None and elapsed > args.deadline
        if stopped:
            for worker in running:
                worker.kill()
                worker.wait()
            running = []
        results = _gather(args.work_dir, cells)
        write_json(
            args.out,
            {
                **environment,
                "seqlen": args.seqlen,
                "workers": args.workers,
                "wall_seconds": elapsed,
                "cells": results,
            },
        )
        if not running:
            break
        time.sleep(2)
    failed = [w.args[-3] for w in workers if w.returncode not in (0, -9)]
    print(
        f"{len(results)} of {len(cells)} cells in {elapsed:.0f} s"
        + ("; stopped at the deadline (run again to resume)" if stopped else "")
        + (f"; workers failed: {', '.join(failed)} (see their logs)" if failed else "")
    )
    return 0 if len(results) == len(cells) else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(results: dict) -> str:
    """The full-length table, the 64-window check against the CPU study, and the cost."""
    cells = {(c["row"], c["pruner"], c["sparsity"]): c for c in results["cells"]}
    full = {key: cell["ppl"][max(cell["ppl"], key=int)] for key, cell in cells.items()}
    dense = cells.get(("dense", None, 0.0))
    lines = [
        f"# Allocation study on {MODEL}: every cell at full WikiText-2 length, on a GPU",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; device: {results['device']}; torch {results['torch']}; "
        f"{results['workers']} worker processes, {results['wall_seconds']:.0f} s wall",
        "- allocations: the per-block sparsities of the CPU study's `ppl.json` files (same "
        "calibration set, games and searches; see allocation-smollm2-135m*.md), pruned and "
        "evaluated here with the `prune` / `evaluate` stages' code, in float32",
        f"- evaluation: WikiText-2 test, all windows of {results['seqlen']} tokens"
        + (f" ({max(dense['ppl'], key=int)} windows, {dense['tokens']} tokens)" if dense else "")
        + f"; dense perplexity {_fmt(full.get(('dense', None, 0.0)))}",
        "",
        "## Perplexity",
        "",
        "Best per column in bold; the last row compares the recommended method (SV-NUP-fit, its "
        "games probed with the pruner itself) with the best method that plays no coalition game.",
        "",
    ]
    for pruner in PRUNERS:
        columns = [s for s in SPARSITIES if any(k[1:] == (pruner, s) for k in full)]
        best = {s: min(v for k, v in full.items() if k[1:] == (pruner, s)) for s in columns}
        lines += [f"| {pruner} | " + " | ".join(f"{s:.0%}" for s in columns) + " |"]
        lines += ["| --- |" + " --- |" * len(columns)]
        for row, _, _ in ROWS:
            values = [full.get((row, pruner, s)) for s in columns]
            if all(v is None for v in values):
                continue
            shown = [
                f"**{_fmt(v)}**" if v == best[s] else _fmt(v)
                for v, s in zip(values, columns, strict=True)
            ]
            lines.append(f"| {row} | " + " | ".join(shown) + " |")
        margins = []
        for s in columns:
            rec = full.get((RECOMMENDED[pruner], pruner, s))
            base = {r: full[(r, pruner, s)] for r in NO_GAME if (r, pruner, s) in full}
            if rec is None or not base:
                margins.append("-")
                continue
            name = min(base, key=base.get)
            margins.append(f"{rec / base[name] - 1:+.1%} vs {name}")
        lines += [f"| {RECOMMENDED[pruner]} vs best no-game | " + " | ".join(margins) + " |", ""]
    checked = [c for c in results["cells"] if "cpu" in c and str(c["cpu"]["windows"]) in c["ppl"]]
    if checked:
        lines += [
            "## The GPU against the CPU study",
            "",
            "The same allocation pruned on the GPU and on the CPU, compared at the window count "
            "the CPU evaluated (64, or all 595 where the CPU ran the full length). The two "
            "round differently, so the masks differ slightly and the error grows through the "
            "blocks: the spread is the numerical noise of one pruning, and a gap between two "
            "methods smaller than it does not rank them.",
            "",
            "| pruner | sparsity | cells | mean abs. difference | largest |",
            "| --- | --- | --- | --- | --- |",
        ]
        for pruner in PRUNERS:
            for sparsity in SPARSITIES:
                mine = [c for c in checked if (c["pruner"], c["sparsity"]) == (pruner, sparsity)]
                if not mine:
                    continue
                gaps = [c["ppl"][str(c["cpu"]["windows"])] / c["cpu"]["ppl"] - 1 for c in mine]
                worst = max(range(len(gaps)), key=lambda i: abs(gaps[i]))
                lines.append(
                    f"| {pruner} | {sparsity:.0%} | {len(mine)} | "
                    f"{sum(map(abs, gaps)) / len(gaps):.2%} | {gaps[worst]:+.2%} "
                    f"({mine[worst]['row']}) |"
                )
        lines.append("")
    pruned = [c for c in results["cells"] if c["pruner"]]
    if pruned:
        lines += ["## Cost on the GPU", ""]
        for pruner in PRUNERS:
            mine = [c for c in pruned if c["pruner"] == pruner]
            if mine:
                prune = sum(c["prune_seconds"] for c in mine) / len(mine)
                evaluate = sum(c["evaluate_seconds"] for c in mine) / len(mine)
                lines.append(
                    f"- {pruner}: {prune:.1f} s to prune and {evaluate:.1f} s to evaluate "
                    f"(64 + all windows) per cell, mean of {len(mine)} cells, "
                    f"{results['workers']} workers sharing the GPU"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "cells":
        cells = collect_cells(args.cache)
        args.out.write_text(json.dumps(cells, indent=1) + "\n")
        print(f"wrote {args.out}: {len(cells)} cells")
        return 0
    if args.command == "worker":
        _worker(args)
        return 0
    if args.command == "run":
        return run(args)
    args.out.write_text(report(json.loads(args.results.read_text())))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
