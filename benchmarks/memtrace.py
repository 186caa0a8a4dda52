"""Where a stage's host memory goes: run one ``python -m svnup STAGE ...`` command in this process,
sampling the resident memory every millisecond, each sample labelled by the svnup functions
running, and print the peak of each label.

Why: a job's `resources:` line gives its peak only; this says which step reaches it (issue 23,
benchmarks/results/scale.md "Host memory at depth").

    PYTHONPATH=. python benchmarks/memtrace.py evaluate --spec ... --model ... --out ...
    PYTHONPATH=. python benchmarks/memtrace.py --timeline /tmp/t.txt coalitions ...

The arguments after the options are a stage's own (`python -m svnup STAGE --help`); the job
writes its output as the stage would.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
# The steps a label names: (module, function or Class.method)
STEPS = (
    ("svnup.stages", "_load"),
    ("svnup.models", "load_model"),
    ("svnup.calibration", "load_statistics"),
    ("svnup.data", "eval_stream"),
    ("svnup.models", "BlockModel.embed"),
    ("svnup.models", "BlockModel.forward_block"),
    ("svnup.models", "BlockModel.sequence_nll"),
    ("svnup.models", "BlockModel._logits"),
    ("svnup.evaluator", "CoalitionEvaluator.evaluate"),
    ("svnup.evaluator", "CoalitionEvaluator._pruned_weights"),
    ("svnup.pruning", "apply_pruned_layers"),
)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class Sampler:
    """Resident memory every ``interval`` seconds, with the names of the steps running."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.running: list[str] = ["-"]
        self.samples: list[tuple[int, str]] = []

    def label(self, module_name: str, qualified: str) -> None:
        owner = importlib.import_module(module_name)
        *classes, name = qualified.split(".")
        for cls in classes:
            owner = getattr(owner, cls)
        function = getattr(owner, name)

        @functools.wraps(function)
        def labelled(*args, **kwargs):
            self.running.append(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.running.pop()

        setattr(owner, name, labelled)

    def _sample(self) -> None:
        while True:
            self.samples.append((resident_bytes(), "/".join(self.running[-3:])))
            time.sleep(self.interval)

    def start(self) -> None:
        threading.Thread(target=self._sample, daemon=True).start()

    def runs(self) -> list[tuple[str, int, int]]:
        """(label, resident bytes at its start, its peak) of each run of one label."""
        runs: list[list] = []
        for rss, label in self.samples:
            if runs and runs[-1][0] == label:
                runs[-1][2] = max(runs[-1][2], rss)
            else:
                runs.append([label, rss, rss])
        return [tuple(run) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeline", help="write every run of a label (start, peak GiB) here")
    parser.add_argument("stage", nargs=argparse.REMAINDER, help="the svnup stage and its arguments")
    args = parser.parse_args()
    sampler = Sampler()
    for module_name, qualified in STEPS:
        sampler.label(module_name, qualified)
    from svnup.cli import main as svnup_main

    imported = resident_bytes()
    sampler.start()
    try:
        svnup_main(args.stage)
    finally:
        time.sleep(0.01)
        gib = 2**30
        peak, where = max(sampler.samples)
        print(f"after imports {imported / gib:.3f} GiB; peak {peak / gib:.3f} GiB in {where}")
        best: dict[str, int] = {}
        for rss, label in sampler.samples:
            best[label] = max(best.get(label, 0), rss)
        for label, rss in sorted(best.items(), key=lambda item: -item[1])[:12]:
            print(f"  {rss / gib:.3f} GiB  {label}")
        if args.timeline:
            with open(args.timeline, "w") as out:
                for label, start, top in sampler.runs():
                    out.write(f"{start / gib:.3f} {top / gib:.3f} {label}\n")


if __name__ == "__main__":
    sys.exit(main())
