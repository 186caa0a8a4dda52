"""EvoPress at the paper's settings on smollm2-135m, on one GPU, against svnup's recommendation in
the same run.

Why: EvoPress's reference setting (400 generations of 64 offspring, survivors 8/2/1 on 2,048 /
16,384 / 65,536 tokens) costs about 1.8 x 10^8 forward tokens a search, far beyond 2 CPU cores
on this model, so the CPU study runs it at a reduced setting. This script runs the workflow on
the GPU machine with ``allocation.evopress`` at the reference's defaults, uniform and the
recommended SV-NUP-fit on halves beside it, Wanda and SparseGPT at each target, evaluated on
WikiText-2 test, and reports each cell's perplexity, the search's fitness curve and each stage's
seconds. A search stopped at the deadline is reported with the generations it finished (its
journal comes back with the report).

The GPU machine reaches no registry and the device tool carries at most 64 MiB a call, less
than the 98 MB GGUF, so ``prepare`` (here, beside ../shared) writes two folders, one per call:

    python benchmarks/bench_gpu_evopress.py prepare              # .dev/call1, .dev/call2
    # call 1, carry [".dev/call1"]: mkdir -p /tmp/evo && cp -r .dev/call1/. /tmp/evo/
    # call 2, carry [".dev/call2"], at once (the machine stays warm 30 s):
    cp -r .dev/call2/. /tmp/evo/ && python3 -m pip install -q --no-index --no-deps --no-compile \\
        --target /tmp/site /tmp/evo/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
        PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu_evopress.py run --inputs /tmp/evo \\
        --work /tmp/evo/work --out $OUT
    # the CPU smoke run of the same path at a tiny setting:
    python benchmarks/bench_gpu_evopress.py run --inputs .dev/call1 .dev/call2 --device cpu \\
        --dtype float32 --pruners wanda --nsamples 4 --num-levels 1 --generations 2 \\
        --offspring 4 --survivors 2 1 --tokens 256 1024 --eval-samples 1 --windows 2 \\
        --cores 1 --work /tmp/evo-smoke --out /tmp/evo-out
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_allocation  # noqa: E402
import device_wheels  # noqa: E402
from bench_gpu_scale import run_until  # noqa: E402

from svnup import config as cfg  # noqa: E402
from svnup import gguf_files  # noqa: E402

MODEL = "smollm2-135m"
GGUF = bench_allocation.SMOLLM_GGUF.name
# Bytes of the GGUF in the first call, beside the wheels and the data (the working tree, about
# 7 MB, travels with each).
FIRST_PART = 45_000_000
CARRY_LIMIT = 64 * 2**20  # what one device call carries, the working tree included
CALIBRATION = f"calib/c4-first-{bench_allocation.CALIBRATION_DOCS}.jsonl"
TEST = "data/wikitext-2-raw-v1/test.jsonl"
ALLOCATIONS = ("uniform", "evopress", "svnup-fit")
PRUNERS = ("wanda", "sparsegpt")
# EvoPress's settings in the repository's config.yaml: the reference's
REFERENCE = yaml.safe_load((REPO / "config.yaml").read_text())["allocation"]["evopress"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: the two calls' folders")
    prep.add_argument("--out", type=Path, default=REPO / ".dev")
    run = sub.add_parser("run", help="on the GPU machine: the workflow and the report")
    run.add_argument("--inputs", type=Path, nargs="+", required=True, help="prepared folders")
    run.add_argument("--work", type=Path, required=True, help="the workflow's folder")
    run.add_argument("--out", type=Path, required=True, help="folder of the report and search")
    run.add_argument("--device", default="cuda")
    run.add_argument("--dtype", default="bfloat16")
    run.add_argument("--sparsities", type=float, nargs="+", default=[0.5])
    run.add_argument(
        "--nsamples",
        type=int,
        default=128,
        help="calibration sequences of 512 tokens (the reference's last step draws 65,536)",
    )
    run.add_argument("--eval-samples", type=int, default=4, help="sequences of the games")
    run.add_argument("--windows", type=int, default=0, help="WikiText-2 windows (0: all 595)")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--cores", type=int, default=16, help="snakemake --cores")
    run.add_argument("--pruners", nargs="+", choices=PRUNERS, default=list(PRUNERS))
    run.add_argument("--num-levels", type=int, default=REFERENCE["num_levels"])
    run.add_argument("--generations", type=int, default=REFERENCE["generations"])
    run.add_argument("--offspring", type=int, default=REFERENCE["offspring"])
    run.add_argument("--survivors", type=int, nargs="+", default=REFERENCE["survivors"])
    run.add_argument("--tokens", type=int, nargs="+", default=REFERENCE["tokens"])
    run.add_argument(
        "--deadline",
        type=float,
        default=540,
        help="seconds after which the workflow is stopped and what finished is reported",
    )
    return p.parse_args(argv)


def _gzip(source: Path, target: Path, lines: int | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as f, gzip.open(target, "wb") as out:
        for index, line in enumerate(f):
            if lines is not None and index == lines:
                break
            out.write(line)


def prepare(out: Path) -> None:
    """The GGUF in two parts with its checksum, the calibration documents and WikiText-2 test
    (gzipped) and the wheels: the first part, data and wheels in call1, the rest in call2."""
    if not bench_allocation.SMOLLM_GGUF.exists():
        raise SystemExit(f"{bench_allocation.SMOLLM_GGUF} is missing; ../shared must sit beside")
    first, second = out / "call1", out / "call2"
    for folder in (first, second):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    data = bench_allocation.SMOLLM_GGUF.read_bytes()
    (first / f"{GGUF}.part1").write_bytes(data[:FIRST_PART])
    (second / f"{GGUF}.part2").write_bytes(data[FIRST_PART:])
    manifest = {"gguf": GGUF, "sha256": gguf_files.digest(bench_allocation.SMOLLM_GGUF)}
    (first / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _gzip(bench_allocation.C4, first / f"{CALIBRATION}.gz", bench_allocation.CALIBRATION_DOCS)
    _gzip(bench_allocation.SHARED / TEST, first / f"{TEST}.gz")
    device_wheels.download(first / "whl")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    tree = sum((REPO / f).stat().st_size for f in listed.split("\0") if (REPO / f).is_file())
    for folder in (first, second):
        size = tree + sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"call carrying {folder.name}: {size / 2**20:.1f} MiB with the working tree")
        if size > CARRY_LIMIT:
            raise SystemExit(f"{folder} and the working tree exceed the 64 MiB a call carries")


def _find(inputs: list[Path], name: str) -> Path:
    for folder in inputs:
        if (folder / name).exists():
            return folder / name
    raise SystemExit(f"{name} is in none of {', '.join(map(str, inputs))}; run prepare")


def assemble(inputs: list[Path], work: Path) -> None:
    """The GGUF joined and checked, and the data unpacked, under ``work``."""
    manifest = json.loads(_find(inputs, "manifest.json").read_text())
    gguf = work / "models" / GGUF
    if not gguf.exists() or gguf_files.digest(gguf) != manifest["sha256"]:
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with gguf.open("wb") as out:
            for part in (f"{GGUF}.part1", f"{GGUF}.part2"):
                out.write(_find(inputs, part).read_bytes())
        if gguf_files.digest(gguf) != manifest["sha256"]:
            raise SystemExit(f"{gguf} does not match the prepared checksum; prepare again")
    for name in (CALIBRATION, TEST):
        target = work / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(_find(inputs, f"{name}.gz")) as f:
                target.write_bytes(f.read())


def study_config(args: argparse.Namespace) -> dict:
    """The CPU study's config (benchmarks/configs/allocation-smollm2-135m.yaml) on the GPU:
    EvoPress at the reference's settings, SV-NUP-fit on halves with matched probes, and the
    calibration large enough for the last selection step."""
    config = yaml.safe_load((HERE / "configs" / f"allocation-{MODEL}.yaml").read_text())
    model = config["models"][MODEL]
    model.update(
        path=f"models/{GGUF}", dtype=args.dtype, device=args.device, batch_size=args.batch_size
    )
    config["calibration"]["nsamples"] = args.nsamples
    config["shapley"].update(players="halves", probe_pruner="match", eval_samples=args.eval_samples)
    config["allocation"]["evopress"] = {
        **REFERENCE,
        "num_levels": args.num_levels,
        "generations": args.generations,
        "offspring": args.offspring,
        "survivors": args.survivors,
        "tokens": args.tokens,
    }
    config["evaluation"]["windows"] = args.windows or None
    config["targets"] = {
        "models": [MODEL],
        "sparsities": args.sparsities,
        "allocations": list(ALLOCATIONS),
        "pruners": args.pruners,
    }
    cfg.validate(config)
    return config


def cells(work: Path, sparsities: list[float], pruners: list[str]) -> list[dict]:
    """Each (target, allocation, pruner) cell's perplexity, where its run finished."""
    rows = []
    for target in sparsities:
        for allocation in ALLOCATIONS:
            for pruner in pruners:
                path = work / f"results/{MODEL}/s{target}/{allocation}/{pruner}/ppl.json"
                run = json.loads(path.read_text()) if path.exists() else None
                ppl = next(iter(run["perplexity"].values())) if run else None
                rows.append(dict(target=target, allocation=allocation, pruner=pruner, ppl=ppl))
    return rows


def searches(work: Path, out: Path) -> list[dict]:
    """Each EvoPress search's generations and fitness, finished or journalled; copied to
    ``out`` so a stopped search's journal comes back."""
    found = []
    for path in sorted((work / f"results/{MODEL}/search/evopress").glob("*/s*")):
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            history, finished = data["history"], True
        elif path.suffix == ".journal":
            history = [json.loads(line) for line in path.read_text().splitlines() if line]
            finished = False
        else:
            continue
        shutil.copy2(path, out / f"search-{path.parent.name}-{path.name}")
        found.append({"target": path.stem[1:], "finished": finished, "history": history})
    return found


def stage_seconds(work: Path) -> dict[str, float]:
    """Wall seconds of each rule's finished jobs, summed (the rules' benchmark records), the
    GGUF's conversion included."""
    totals: dict[str, float] = {}
    records = work / f"results/{MODEL}/benchmarks"
    conversions = sorted((work / cfg.GGUF_FOLDER / "benchmarks").glob("*.tsv"))
    for tsv in [*records.rglob("*.tsv"), *conversions]:
        rule = "convert_gguf" if tsv in conversions else tsv.relative_to(records).parts[0]
        seconds = float(tsv.read_text().splitlines()[1].split("\t")[0])
        totals[rule] = totals.get(rule, 0.0) + seconds
    return dict(sorted(totals.items()))


def _dense(work: Path) -> str:
    path = work / f"results/{MODEL}/dense/ppl.json"
    return (
        f"{next(iter(json.loads(path.read_text())['perplexity'].values())):.2f}"
        if path.exists()
        else "-"
    )


def report(args, config, wall: float, stopped: bool, rows, found, stages) -> str:
    import torch

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    evo = config["allocation"]["evopress"]
    lines = [
        "# EvoPress at the paper's settings on smollm2-135m, on one GPU",
        "",
        f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; device: {device}; torch "
        f"{torch.__version__}; {args.dtype}",
        f"- EvoPress: {evo['generations']} generations of {evo['offspring']} offspring, "
        f"survivors {evo['survivors']} on {evo['tokens']} tokens, {evo['num_levels']} levels "
        f"each side, SparseGPT's level database; calibration {args.nsamples} x 512 tokens of the "
        f"first {bench_allocation.CALIBRATION_DOCS} C4 documents; SV-NUP-fit on halves, matched "
        f"probes, {args.eval_samples} game sequences",
        f"- evaluation: WikiText-2 test, {args.windows or 'all'} windows of 512 tokens; dense "
        f"perplexity {_dense(args.work)}",
        f"- workflow: {wall:.0f} s wall"
        + (" (stopped at the deadline; missing cells did not finish)" if stopped else ""),
        "",
        "| target | pruner | " + " | ".join(ALLOCATIONS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in ALLOCATIONS) + " |",
    ]
    for target in args.sparsities:
        for pruner in args.pruners:
            values = {
                r["allocation"]: r["ppl"]
                for r in rows
                if r["target"] == target and r["pruner"] == pruner
            }
            shown = ["-" if values[a] is None else f"{values[a]:.2f}" for a in ALLOCATIONS]
            lines.append(f"| {target:.0%} | {pruner} | " + " | ".join(shown) + " |")
    lines += ["", "| search | generations | seconds a generation | fitness every 25 |"]
    lines += ["| --- | --- | --- | --- |"]
    for search in found:
        history = search["history"]
        seconds = sum(row["seconds"] for row in history) / max(len(history), 1)
        curve = ", ".join(f"{row['fitness']:.4g}" for row in history[::25])
        state = "" if search["finished"] else " (stopped)"
        lines.append(f"| s{search['target']}{state} | {len(history)} | {seconds:.2f} | {curve} |")
    lines += ["", "| stage | seconds, jobs summed |", "| --- | --- |"]
    lines += [f"| {rule} | {seconds:.0f} |" for rule, seconds in stages.items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    work, out = args.work.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    assemble(args.inputs, work)
    config = study_config(args)
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/{MODEL}/dense/ppl.json"] + [
        f"results/{MODEL}/s{t}/{a}/{p}/ppl.json"
        for t in args.sparsities
        for a in ALLOCATIONS
        for p in args.pruners
    ]
    command, env = bench_allocation.snakemake_command(work, targets, args.cores)
    command += ["--scheduler", "greedy", "--keep-going"]  # no pulp on the GPU machine
    print(f"snakemake in {work} (log: {work / 'snakemake.log'})", flush=True)
    left = args.deadline - (time.monotonic() - started)
    began = time.perf_counter()
    returncode, stopped = run_until(command, work, env, work / "snakemake.log", left)
    wall = time.perf_counter() - began
    shutil.copy2(work / "snakemake.log", out / "snakemake.log")
    rows, found = cells(work, args.sparsities, args.pruners), searches(work, out)
    text = report(args, config, wall, stopped, rows, found, stage_seconds(work))
    (out / "gpu-evopress.md").write_text(text)
    (out / "gpu-evopress.json").write_text(json.dumps({"cells": rows, "searches": found}))
    print(text)
    if returncode != 0 and not stopped:
        print(f"snakemake failed (exit {returncode}); see {out / 'snakemake.log'}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "prepare":
        prepare(args.out.resolve())
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
