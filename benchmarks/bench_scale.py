"""Scaling study: the recommended pipeline through the workflow on a ladder of real-model shapes.

Why: issue 23 asks what the recommended settings (leave-one-out games on half-block players at
the svnup-fit levels 0.6/0.7/0.8, each run's games probed with its own pruner) cost at the size
users prune, and which stage stops scaling first. Two CPU cores cannot run a 7B model, so the
workflow runs on random-weight checkpoints of the real architectures (benchmarks/shapes.py),
scaled down in one direction at a time (width at a few blocks, depth at a small width, the
vocabulary, the token counts), and every stage's cost is fitted by a FLOP model with one
throughput per stage (``svnup.costs``), from which the full protocol is predicted.

    python benchmarks/bench_scale.py run                 # every ladder point not measured yet
    python benchmarks/bench_scale.py run --only d512-L2  # one point (again)
    python benchmarks/bench_scale.py report --out benchmarks/results/scale.md

Each point runs in benchmarks/.cache/scale/<point>/ from an empty results/ folder, with one torch
thread per job and ``snakemake --cores 2``, and leaves a ``record.json`` there: per job the
rule's benchmark record (wall seconds, CPU seconds, peak resident memory), what the job
computed (its level, pruner, block forwards) and the disk of every intermediate. The two cores
are shared with other work, so wall seconds are inflated and the fits use CPU seconds.
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import shapes  # noqa: E402
from bench_allocation import snakemake_command  # noqa: E402

CACHE = HERE / ".cache" / "scale"
MODEL = "m"  # the model's name inside each point's workflow
TARGET = 0.7


@dataclass(frozen=True)
class Point:
    """One workflow run: a shape (``shapes.scaled``) and the token counts of its stages."""

    id: str
    base: str = "llama-2-7b"
    blocks: int | None = None
    width: int | None = None
    vocab: int | None = None
    seqlen: int = 128
    nsamples: int = 8
    eval_samples: int = 4
    windows: int = 4
    pruners: tuple[str, ...] = ("sparsegpt", "wanda")
    dtype: str = "float32"

    def shape(self) -> dict:
        return shapes.scaled(self.base, self.blocks, self.width, self.vocab)


SPARSEGPT = ("sparsegpt",)  # the recommended pruner alone where Wanda adds no new direction
LADDER = (
    # width at two blocks of LLaMA-2-7B (head size 128, MLP ratio 2.6875), depth at width 256
    # up to LLaMA-2-7B's 32 blocks, in the order that measures the most first
    Point("d256-L2", blocks=2, width=256),
    Point("d2048-L2", blocks=2, width=2048, pruners=SPARSEGPT),
    Point("d256-L32", width=256, pruners=SPARSEGPT),
    Point("d1024-L2", blocks=2, width=1024),
    # Llama-3-8B's 128K vocabulary and grouped-query attention
    Point("llama3-d256-L2", base="llama-3-8b", blocks=2, width=256, pruners=SPARSEGPT),
    # longer sequences: attention grows with them
    Point("d512-L2-s256", blocks=2, width=512, seqlen=256, pruners=SPARSEGPT),
    # the model's dtype on the disk (probes stored in it): bfloat16
    Point("d512-L2-bf16", blocks=2, width=512, dtype="bfloat16", pruners=SPARSEGPT),
    Point("d256-L8", blocks=8, width=256, pruners=SPARSEGPT),
    # host memory where one block is a sixteenth of the weights (a gigabyte in float32)
    Point("d1024-L16", blocks=16, width=1024, pruners=SPARSEGPT),
)


def point_config(point: Point) -> dict:
    """The recommended settings (config.yaml's llama-7b entry) at the point's token counts."""
    return {
        "models": {
            MODEL: {
                "path": "models/m",
                "dtype": point.dtype,
                "seqlen": point.seqlen,
                "device": "cpu",
                "batch_size": 8,
            }
        },
        "calibration": {
            "dataset": "data/wikitext-2-standin",
            "nsamples": point.nsamples,
            "seed": 0,
        },
        "shapley": {
            "estimator": "loo",
            "players": "halves",
            "window": 4,
            "stride": 1,
            "n_permutations": 64,
            "eval_samples": point.eval_samples,
            "ablation": "prune",
            "probe_sparsity": 0.7,
            "probe_pruner": "match",
            "value": "neg_nll",
            "targets": "text",
        },
        "allocation": {
            "method": "svnup-fit",
            "min": 0.0,
            "max": 0.99,
            "svnup-fit": {"levels": [0.6, 0.7, 0.8], "floor": 0.05},
        },
        "pruner": point.pruners[0],
        "evaluation": {
            "datasets": ["data/wikitext-2-standin"],
            "split": "test",
            "windows": point.windows,
        },
        "save_model": True,  # keeps the pruned checkpoints, so their disk can be measured
        "keep_probes": True,  # and the probes
        "targets": {
            "models": [MODEL],
            "sparsities": [TARGET],
            "allocations": ["svnup-fit"],
            "pruners": list(point.pruners),
        },
    }


def targets(point: Point) -> list[str]:
    runs = [f"results/{MODEL}/s{TARGET}/svnup-fit/{p}/ppl.json" for p in point.pruners]
    return [f"results/{MODEL}/dense/ppl.json", *runs]


def checkpoint(point: Point) -> Path:
    shape = point.shape()
    name = shapes.variant_name(point.base, point.blocks, point.width, point.vocab)
    return shapes.write_checkpoint(shape, shapes.CACHE / f"{name}-{point.dtype}", point.dtype)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=True)


def run_point(point: Point, cores: int) -> dict:
    """Run the point's workflow from an empty results/ and token cache; write its record."""
    workdir = CACHE / point.id
    model = checkpoint(point)
    data = shapes.write_standin(CACHE.parent / "data")
    for folder in (workdir / "results", workdir / ".cache", workdir / ".snakemake"):
        shutil.rmtree(folder, ignore_errors=True)
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    _link(workdir / "models" / MODEL, model)
    _link(workdir / "data" / data.name, data)
    config = point_config(point)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command, env = snakemake_command(workdir, targets(point), cores)
    log = workdir / "snakemake.log"
    print(f"{point.id}: snakemake in {workdir} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{point.id}: snakemake failed (exit {result.returncode}); see {log}")
    record = {
        "point": asdict(point),
        "shape": point.shape(),
        "model_bytes": _size(model),
        "command": shlex.join(["snakemake", *command[3:]]),
        "wall_seconds": seconds,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load": os.getloadavg(),
        "jobs": jobs(workdir / "results" / MODEL),
        "disk": disk(workdir / "results" / MODEL),
        "code": _git_head(),
    }
    (workdir / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _git_head() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], **_quiet())
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], **_quiet())
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _quiet() -> dict:
    return {"capture_output": True, "text": True, "check": False}


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Job:
    """One job's wall seconds (the rule's benchmark record), CPU seconds and peak memory (what
    the stage logged at its end, exact, where the benchmark record samples them every 30 s;
    the record's own numbers for stages that log none) and what it computed."""

    rule: str
    path: str
    s: float
    cpu_time: float
    max_rss_mb: float
    peak_gpu_gib: float | None = None
    detail: dict = field(default_factory=dict)


def logged_resources(log: Path) -> dict:
    """The ``resources:`` line of a stage's log (``svnup.cli``), as numbers; empty if none."""
    if not log.exists():
        return {}
    lines = [line for line in log.read_text().splitlines() if "resources: " in line]
    if not lines:
        return {}
    parts = lines[-1].split("resources: ")[1].split(", ")
    found = {"cpu_time": float(parts[0].split()[0])}
    found["max_rss_mb"] = float(parts[1].split()[3]) * 1024
    if len(parts) > 2:
        found["peak_gpu_gib"] = float(parts[2].split()[3])
    return found


def jobs(results: Path) -> list[dict]:
    """Every job's record, with the level, pruner and block forwards of its output."""
    import pandas as pd

    rows = []
    for tsv in sorted((results / "benchmarks").glob("**/*.tsv")):
        table = pd.read_csv(tsv, sep="\t")
        relative = tsv.relative_to(results / "benchmarks")
        rule = relative.parts[0]
        sampled = {
            "cpu_time": float(table["cpu_time"].iloc[0]),
            "max_rss_mb": float(table["max_rss"].iloc[0]),
        }
        logged = logged_resources(results / "logs" / relative.with_suffix(".log"))
        job = Job(
            rule=rule,
            path=str(relative),
            s=float(table["s"].iloc[0]),
            **{**sampled, **logged},
            detail=_detail(results, rule, relative),
        )
        rows.append(asdict(job))
    return rows


def _detail(results: Path, rule: str, relative: Path) -> dict:
    """What a job computed, read from its output."""
    from svnup.io import open_h5

    stem = relative.with_suffix("")
    if rule == "probe":
        with open_h5(results / "probe" / stem.parts[1] / "masks.h5") as f:
            spec = json.loads(f.attrs["meta"])["spec"]
        return {"pruner": spec["pruner"], "level": spec["sparsity"]}
    if rule == "coalitions":
        path = results / "coalitions" / Path(*stem.parts[1:]).with_suffix(".h5")
        with open_h5(path) as f:
            evaluation = json.loads(f.attrs["evaluation"])
            spec = json.loads(f.attrs["spec"])
        store = results / "coalitions" / stem.parts[1]
        probe = next(
            (p for p in (results / "probe").glob("*/masks.h5") if p.parent.name == spec["probe"]),
            None,
        )
        level = pruner = None
        if probe is not None:
            with open_h5(probe) as f:
                meta = json.loads(f.attrs["meta"])["spec"]
            level, pruner = meta["sparsity"], meta["pruner"]
        return {
            "level": level,
            "pruner": pruner,
            "coalitions": evaluation["coalitions"],
            "evaluated": evaluation["evaluated"],
            "block_forwards": evaluation["block_forwards"],
            "store": store.name,
        }
    if rule == "prune":
        return {"pruner": relative.parts[3]}
    if rule == "evaluate":
        run = relative.parts[1]
        evaluation = results / "runs" / Path(*relative.parts[1:-1]) / "eval"
        record = json.loads((evaluation / f"{relative.stem}.json").read_text())
        return {"run": run, "windows": record["windows"], "tokens": record["tokens"]}
    return {}


def disk(results: Path) -> dict:
    """Bytes of every intermediate kind, and of each probe file by its level and pruner."""
    from svnup.io import open_h5

    probes = []
    for path in sorted((results / "probe").glob("*/masks.h5")):
        with open_h5(path) as f:
            spec = json.loads(f.attrs["meta"])["spec"]
        probes.append({"pruner": spec["pruner"], "level": spec["sparsity"], "bytes": _size(path)})
    checkpoints = sorted((results / "runs").glob("svnup-fit/*/*/*/model"))
    return {
        "calibration": sum(_size(p) for p in (results / "calibration").glob("*/calibration.h5")),
        "probes": probes,
        "coalitions": _size(results / "coalitions"),
        "scores": _size(results / "shapley") + _size(results / "curves"),
        "budgets": _size(results / "budget"),
        "checkpoints": [_size(p) for p in checkpoints],
        "tokens": _size(results.parent.parent / ".cache" / "tokens"),
    }


def load_records(points=LADDER) -> list[dict]:
    found = []
    for point in points:
        path = CACHE / point.id / "record.json"
        if path.exists():
            found.append(json.loads(path.read_text()))
    return found


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the ladder's workflows")
    run.add_argument("--only", nargs="*", default=None, help="point ids to (re)run")
    run.add_argument("--cores", type=int, default=2)
    report = sub.add_parser("report", help="fit the records and write the markdown")
    report.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "run":
        known = {p.id: p for p in LADDER}
        unknown = sorted(set(args.only or []) - set(known))
        if unknown:
            raise SystemExit(f"unknown points {unknown}; the ladder has {sorted(known)}")
        for point in LADDER:
            done = (CACHE / point.id / "record.json").exists()
            if (args.only is None and not done) or point.id in (args.only or []):
                run_point(point, args.cores)
        return 0
    from scale_report import report

    args.out.write_text(report(load_records(), platform.processor() or platform.machine()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
