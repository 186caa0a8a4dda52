"""The demo, timed as a newcomer meets it: ``snakemake --cores all`` in a fresh clone.

Why: the README promises that the default target runs offline in a few minutes on 2 cores. This
clones the committed HEAD of this checkout into ``--workdir`` (no results, an empty token cache),
runs exactly the README's command there, and writes the wall time, the CPU time of the command
and its jobs, the machine's load while it ran, and the demo's perplexities to
``benchmarks/results/demo.md``. Run it on otherwise idle cores:

    python benchmarks/bench_demo.py
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
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh_clone(workdir: Path) -> tuple[Path, str]:
    """A clone of this checkout's HEAD in ``workdir/clone``, and the commit it holds."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    commit = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return clone, commit


def run_demo(clone: Path, workdir: Path) -> tuple[float, float, float, float]:
    """Wall and CPU seconds of ``snakemake --cores all`` in the clone, and the load before and
    after (1-minute averages)."""
    env = {**os.environ, "SVNUP_CACHE": str(workdir / "tokens"), "PYTHONPATH": str(clone)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), _children_cpu()
    with open(workdir / "snakemake.log", "w") as log:
        subprocess.run(
            ["snakemake", "--cores", "all"], cwd=clone, env=env, stdout=log, stderr=log, check=True
        )
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    return wall, cpu, load_before, os.getloadavg()[0]


def report(clone: Path, commit: str, wall: float, cpu: float, loads: tuple[float, float]) -> str:
    with (clone / "results" / "demo" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    dense = next(float(r["ppl"]) for r in rows if r["allocation"] == "dense")
    runs = [r for r in rows if r["allocation"] != "dense"]
    targets = sorted({r["sparsity"] for r in runs}, key=float)
    methods = list(dict.fromkeys(r["allocation"] for r in runs))
    ppl = {(r["allocation"], r["sparsity"]): float(r["ppl"]) for r in runs}
    lines = [
        "# The demo in a fresh clone",
        "",
        f"- command: `time snakemake --cores all` in a fresh clone of commit {commit} "
        "(made by `python benchmarks/bench_demo.py`; empty results/ and token cache)",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores; 1-minute load average "
        f"{loads[0]:.1f} before the run, {loads[1]:.1f} at its end",
        f"- torch {metadata.version('torch')}, transformers {metadata.version('transformers')}, "
        f"snakemake {metadata.version('snakemake')}",
        f"- **wall time: {wall / 60:.1f} min** ({wall:.0f} s); CPU time of the command and its "
        f"jobs: {cpu / 60:.1f} min",
        "",
        f"## Held-out perplexity (Wanda; dense {dense:.2f})",
        "",
        "| allocation | " + " | ".join(f"{float(t):.0%}" for t in targets) + " |",
        "| --- |" + " --- |" * len(targets),
        *(f"| {m} | " + " | ".join(f"{ppl[m, t]:.2f}" for t in targets) + " |" for m in methods),
        "",
        "The demo model (1M parameters, trained on Python's documentation) exercises every stage;",
        "it cannot rank the methods for a real LLM.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=HERE / ".cache" / "demo")
    p.add_argument("--out", type=Path, default=HERE / "results" / "demo.md")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    clone, commit = fresh_clone(workdir)
    wall, cpu, *loads = run_demo(clone, workdir)
    args.out.write_text(report(clone, commit, wall, cpu, tuple(loads)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
