"""The fitness of EvoPress searches against their generations, as a Markdown table.

Why: a search run at fewer generations than the reference's 400 is only a fair rival if the
reader can see whether it converged. Each search JSON (``results/<model>/search/evopress/<key>/
s<S>.json``) records the best fitness of every generation's last selection step, measured on that
step's fresh minibatch, so single values are noisy; the table shows them every ``--every``
generations with the mean of the last ``--window``. ``--blocks N`` adds the mean of each run of N
generations and its change from the run before, the figure that says whether a search has
levelled off.

    python benchmarks/search_curve.py uniform=PATH seeded=PATH --every 5 --blocks 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("searches", nargs="+", metavar="LABEL=PATH", help="search JSON files")
    p.add_argument("--every", type=int, default=5, help="show every n-th generation")
    p.add_argument("--window", type=int, default=5, help="generations of the trailing mean")
    p.add_argument(
        "--blocks", type=int, default=0, help="also tabulate the mean of each run of N generations"
    )
    args = p.parse_args(argv)
    for item in args.searches:
        if "=" not in item:
            p.error(f"{item}: write LABEL=PATH")
    return args


def fitness_curve(path: Path) -> list[float]:
    """The best fitness of each generation, in order."""
    history = json.loads(path.read_text())["history"]
    return [row["fitness"] for row in sorted(history, key=lambda row: row["generation"])]


def table(curves: dict[str, list[float]], every: int, window: int) -> list[str]:
    labels = list(curves)
    heads = " | ".join(f"{label} | mean of last {window}" for label in labels)
    lines = [
        f"| generation | {heads} |",
        "| --- |" + " --- | --- |" * len(labels),
    ]
    longest = max(len(c) for c in curves.values())
    shown = sorted({*range(every - 1, longest, every), longest - 1})
    for g in shown:
        cells = []
        for label in labels:
            curve = curves[label]
            if g < len(curve):
                tail = curve[max(0, g + 1 - window) : g + 1]
                cells += [f"{curve[g]:.4f}", f"{sum(tail) / len(tail):.4f}"]
            else:
                cells += ["", ""]
        lines.append(f"| {g + 1} | " + " | ".join(cells) + " |")
    return lines


def block_means(curve: list[float], size: int) -> list[float]:
    """The mean fitness of each whole run of ``size`` generations; a partial run is dropped."""
    return [sum(curve[i : i + size]) / size for i in range(0, len(curve) - size + 1, size)]


def block_table(curves: dict[str, list[float]], size: int) -> list[str]:
    labels = list(curves)
    means = {label: block_means(curve, size) for label, curve in curves.items()}
    heads = " | ".join(f"{label} | change" for label in labels)
    lines = [f"| generations | {heads} |", "| --- |" + " --- | --- |" * len(labels)]
    for b in range(max(len(m) for m in means.values())):
        cells = []
        for label in labels:
            m = means[label]
            if b >= len(m):
                cells += ["", ""]
                continue
            change = f"{100 * (m[b] / m[b - 1] - 1):+.1f}%" if b else ""
            cells += [f"{m[b]:.4f}", change]
        lines.append(f"| {b * size + 1}-{(b + 1) * size} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    curves = {}
    for item in args.searches:
        label, path = item.split("=", 1)
        curves[label] = fitness_curve(Path(path))
    print("\n".join(table(curves, args.every, args.window)))
    if args.blocks:
        print()
        print("\n".join(block_table(curves, args.blocks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
