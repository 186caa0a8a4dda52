"""Figures and a self-contained HTML page for one model's results."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from svnup.io import atomic_path, read_json  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_shapley(
    values: np.ndarray,
    stderr: np.ndarray,
    path: Path,
    title: str,
    players: list[dict] | None = None,
) -> None:
    """Per-block Shapley values with one standard error where the estimator has one; with
    ``players`` (a game of block halves or linear layers) one bar per player, side by side at its
    block, one colour per kind of player (attention and MLP, or q, k, v, ...)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    err = np.where(np.isfinite(stderr), stderr, 0.0)
    if players is None:
        ax.bar(np.arange(len(values)), values, yerr=err, capsize=3, color="tab:blue")
    else:
        kinds = [p["name"].split(".", 1)[1] for p in players]
        order = list(dict.fromkeys(kinds))
        width = 0.8 / len(order)
        for slot, kind in enumerate(order):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            x = [players[i]["block"] - 0.4 + width * (slot + 0.5) for i in rows]
            color = f"C{slot % 10}"
            ax.bar(x, values[rows], width, yerr=err[rows], capsize=2, color=color, label=kind)
        ax.legend(fontsize=8 if len(order) <= 2 else 6, ncol=1 if len(order) <= 2 else 2)
    ax.set_xlabel("block")
    ax.set_ylabel("Shapley value (-mean NLL)")
    ax.set_title(title)
    _save(fig, path)


def plot_sparsity(budgets: list[dict], path: Path) -> None:
    """Per-block sparsity of each allocator, one panel per target sparsity."""
    targets = sorted({b["target"] for b in budgets})
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        for plan in sorted(
            (b for b in budgets if b["target"] == target), key=lambda b: b["spec"]["method"]
        ):
            ax.plot(plan["sparsities"], marker="o", ms=3, label=plan["spec"]["method"])
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_title(f"target {target:g}")
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
    axes[0][-1].legend(fontsize=8)
    _save(fig, path)


def plot_perplexity(table: pd.DataFrame, path: Path) -> None:
    """Perplexity against target sparsity for each allocator and pruner, one panel per dataset."""
    datasets = sorted(table["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = table[table["dataset"] == dataset]
        dense = rows[rows["allocation"] == "dense"]["ppl"]
        for (allocation, pruner), run in rows[rows["allocation"] != "dense"].groupby(
            ["allocation", "pruner"]
        ):
            run = run.sort_values("sparsity")
            ax.plot(run["sparsity"], run["ppl"], marker="o", label=f"{allocation} / {pruner}")
        if len(dense):
            ax.axhline(float(dense.iloc[0]), color="black", lw=0.8, ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel("perplexity")
        ax.set_title(Path(dataset).name)
        ax.legend(fontsize=8)
    _save(fig, path)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _zero_shot_section(table: pd.DataFrame) -> list[str]:
    """Mean zero-shot accuracy per run (one value per run, repeated on its dataset rows)."""
    if "zero_shot_acc" not in table or table["zero_shot_acc"].isna().all():
        return []
    accuracy = table.pivot_table(
        index=["pruner", "allocation"], columns="sparsity", values="zero_shot_acc"
    )
    return [
        "<h2>Zero-shot accuracy</h2>",
        "<p>Mean lm-evaluation-harness accuracy (acc) over the configured tasks.</p>",
        accuracy.to_html(float_format=lambda x: f"{x:.4f}", na_rep="-"),
    ]


def make_report(
    results: Path, out_dir: Path, summary: Path, shapley: Path | None, budgets: list[Path]
) -> Path:
    """Write shapley.png, sparsity.png, perplexity.png and report.html under ``out_dir``."""
    from svnup.io import read_scores

    out_dir = Path(out_dir)
    table = pd.read_csv(summary)
    figures = []
    if shapley is not None:
        values, stderr, meta = read_scores(shapley)
        values = np.asarray(values, dtype=float)
        stderr = np.array([np.nan if e is None else e for e in stderr])
        players = meta.get("players")
        title = f"{results.name}: {'block' if players is None else 'half-block'} importance"
        plot_shapley(values, stderr, out_dir / "shapley.png", title, players)
        figures.append(out_dir / "shapley.png")
    if budgets:
        plot_sparsity([read_json(p) for p in budgets], out_dir / "sparsity.png")
        figures.append(out_dir / "sparsity.png")
    plot_perplexity(table, out_dir / "perplexity.png")
    figures.append(out_dir / "perplexity.png")
    pivot = table.pivot_table(
        index=["dataset", "pruner", "allocation"], columns="sparsity", values="ppl"
    )
    page = "\n".join(
        [
            "<!doctype html><meta charset='utf-8'>",
            f"<title>svnup report: {html.escape(results.name)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
            "img{max-width:100%}td,th{padding:2px 8px;text-align:right}</style>",
            f"<h1>svnup: {html.escape(results.name)}</h1>",
            "<h2>Perplexity</h2>",
            pivot.to_html(float_format=lambda x: f"{x:.3f}", na_rep="-"),
            *_zero_shot_section(table),
            *[_img(path) for path in figures],
        ]
    )
    target = out_dir / "report.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target
