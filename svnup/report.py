"""Figures and a self-contained HTML page for one model's results, opening with a one-line
verdict per target sparsity, pruner and dataset: which allocation won, and by how much."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, ScalarFormatter  # noqa: E402

from svnup.io import atomic_path  # noqa: E402
from svnup.provenance import read_budget  # noqa: E402
from svnup.registry import ALLOCATIONS, PRUNERS  # noqa: E402

# Perplexities closer than this (relative) tie: their margin would print as 0.0%.
TIE = 5e-4
# One colour per allocation method in every figure (uniform gets tab10's grey).
COLORS = dict(zip(ALLOCATIONS, plt.get_cmap("tab10").colors, strict=False))
LINESTYLES = ("-", "--", "-.")


def allocation_label(method: str) -> str:
    """A published allocator by its paper's name (OWL, ATP), svnup's own by the config name."""
    entry = ALLOCATIONS.get(method)
    return entry.published if entry is not None and entry.published else method


def pruner_label(pruner: str) -> str:
    return PRUNERS[pruner].label if pruner in PRUNERS else pruner


def dataset_label(dataset: str) -> str:
    return Path(dataset).name


def plain_number(value: float) -> str:
    """A tick value as a plain number (90, 1500, 0.25), never 9x10^1 or 1e+03."""
    return np.format_float_positional(value, precision=6, unique=True, fractional=False, trim="-")


def _decimals(value: float) -> int:
    return len(plain_number(value).partition(".")[2])


class PlainLogFormatter(LogFormatter):
    """Labels the ticks matplotlib's log formatter would label, as plain numbers; within one
    decade (where intermediate ticks are labelled) all with the same decimals (257.5, 258.0)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return plain_number(x) if super().__call__(x, pos) else ""

    def format_ticks(self, values) -> list[str]:
        labels = super().format_ticks(values)
        shown = [v for v, label in zip(values, labels, strict=True) if label]
        if not shown or max(shown) >= 10 * min(shown):
            return labels
        decimals = max(_decimals(v) for v in shown)
        return [
            f"{v:.{decimals}f}" if label else "" for v, label in zip(values, labels, strict=True)
        ]


def plain_ticks(ax) -> None:
    """Plain tick labels on both axes: log axes without powers of ten, linear axes without an
    offset or a scientific multiplier. Call after setting the scales (that resets formatters)."""
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(PlainLogFormatter())
            axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
        else:
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            axis.set_major_formatter(formatter)


def _style(method: str, recommended: str | None) -> dict:
    """Line style of an allocation method: the recommended one thick, on top, and labelled so."""
    style = {"color": COLORS.get(method), "lw": 1.3, "zorder": 2, "label": allocation_label(method)}
    if method == recommended:
        style.update(lw=2.8, zorder=3, label=f"{style['label']} (recommended)")
    return style


def _order(method: str) -> int:
    """Registry order, which the figures and verdicts list methods in."""
    return list(ALLOCATIONS).index(method) if method in ALLOCATIONS else len(ALLOCATIONS)


def _recommended_first(methods, recommended: str | None) -> list[str]:
    return sorted(methods, key=lambda m: (m != recommended, _order(m)))


def _legend(fig: Figure, axes, extra: tuple[Line2D, ...] = ()) -> None:
    """One legend for all panels, right of them, each label once (panels and pruners share the
    methods), then the ``extra`` entries."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    entries.update({line.get_label(): line for line in extra})
    fig.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize=8)


def _save(fig: Figure, path: Path) -> None:
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
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
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
    plain_ticks(ax)
    _save(fig, path)


def plot_sparsity(budgets: list[dict], path: Path, recommended: str | None = None) -> Figure:
    """Per-block sparsity of each allocator, one panel per target sparsity; the recommended
    allocator is drawn thick and named so. Returns the (closed) figure, whose lines stay
    readable."""
    targets = sorted({b["target"] for b in budgets})
    fig, axes = plt.subplots(
        1,
        len(targets),
        figsize=(3.5 * len(targets) + 1.6, 3.2),
        squeeze=False,
        layout="constrained",
    )
    for ax, target in zip(axes[0], targets, strict=True):
        plans = [b for b in budgets if b["target"] == target]
        methods = _recommended_first({b["spec"]["method"] for b in plans}, recommended)
        for method in methods:
            for plan in (b for b in plans if b["spec"]["method"] == method):
                ax.plot(plan["sparsities"], marker="o", ms=3, **_style(method, recommended))
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_title(f"target sparsity {plain_number(target)}")
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        plain_ticks(ax)
    _legend(fig, axes[0])
    _save(fig, path)
    return fig


def plot_perplexity(table: pd.DataFrame, path: Path, recommended: str | None = None) -> Figure:
    """Perplexity against target sparsity for each allocator (a colour each) and pruner (a line
    style each, in the legend after the allocators), one panel per dataset; the recommended
    allocator is drawn thick and named so. Returns the (closed) figure, whose lines stay readable.
    """
    datasets = sorted(table["dataset"].unique())
    pruned = table[table["allocation"] != "dense"]
    pruners = sorted(pruned["pruner"].unique())
    linestyles = dict(zip(pruners, LINESTYLES * len(pruners), strict=False))
    fig, axes = plt.subplots(
        1,
        len(datasets),
        figsize=(4.5 * len(datasets) + 1.8, 3.5),
        squeeze=False,
        layout="constrained",
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = pruned[pruned["dataset"] == dataset]
        for method in _recommended_first(rows["allocation"].unique(), recommended):
            for pruner, linestyle in linestyles.items():
                run = rows[(rows["allocation"] == method) & (rows["pruner"] == pruner)]
                if not run.empty:
                    run = run.sort_values("sparsity")
                    style = _style(method, recommended)
                    ax.plot(run["sparsity"], run["ppl"], marker="o", ls=linestyle, **style)
        dense = table[(table["dataset"] == dataset) & (table["allocation"] == "dense")]["ppl"]
        if len(dense):
            ax.axhline(float(dense.iloc[0]), color="black", lw=0.8, ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xticks(sorted(rows["sparsity"].unique()))
        ax.set_xlabel("target sparsity")
        ax.set_ylabel("perplexity")
        title = dataset_label(dataset)
        if len(pruners) == 1:
            title += f", {pruner_label(pruners[0])}"
        ax.set_title(title)
        plain_ticks(ax)
    pruner_styles = tuple(
        Line2D([], [], color="black", lw=1.3, ls=linestyle, label=pruner_label(pruner))
        for pruner, linestyle in linestyles.items()
    )
    _legend(fig, axes[0], pruner_styles if len(pruners) > 1 else ())
    _save(fig, path)
    return fig


def _camp(method: str) -> str:
    if method == "uniform":
        return "uniform"
    entry = ALLOCATIONS.get(method)
    return "published" if entry is not None and entry.published else "svnup"


# How a verdict names the best of a camp that did not win, and what it says where one is missing.
_RUNNER_UP = {
    "uniform": "",
    "published": " (the best published allocator here)",
    "svnup": " (the best svnup method here)",
}
_MISSING = {"uniform": "no uniform run", "published": "no published allocator in this run"}


def verdict(ppl: dict[str, float], recommended: str | None = None) -> str:
    """Which allocation has the lowest perplexity and how far below uniform, the best published
    allocator (OWL, DLP, AlphaPruning, ATP) and svnup's best it is, each that did not win or tie.

    ``ppl`` maps allocation method -> perplexity of one target sparsity, pruner and dataset.
    """

    def winner(method: str) -> str:
        return allocation_label(method) + (" (recommended)" if method == recommended else "")

    ranked = sorted(ppl, key=lambda m: (ppl[m], _order(m)))
    best = ppl[ranked[0]]
    if len(ranked) == 1:
        return f"{winner(ranked[0])} at {best:.2f}, the only allocation in this run"
    winners = [m for m in ranked if ppl[m] == best or 1 - best / ppl[m] < TIE]
    if len(winners) == 1:
        text = f"{winner(winners[0])} best at {best:.2f}"
    else:
        names = [winner(m) for m in winners]
        text = f"{', '.join(names[:-1])} and {names[-1]} tie at {best:.2f}"
    won = {_camp(m) for m in winners}
    margins = []
    for camp, described in _RUNNER_UP.items():
        members = [m for m in ranked if _camp(m) == camp]
        if camp in won:
            continue
        if members:
            margin = 1 - best / ppl[members[0]]
            margins.append(f"{margin:.1%} below {allocation_label(members[0])}{described}")
        elif camp in _MISSING:
            margins.append(_MISSING[camp])
    text = ", ".join([text, *margins])
    if "uniform" in won:
        return f"{text}; no allocation beats uniform here"
    if won == {"published"}:
        return f"{text}; a published allocator is best here"
    return text


def _verdict_rows(table: pd.DataFrame, recommended: str | None) -> list[tuple[str, str]]:
    """(what was run, its verdict) per target sparsity, pruner and dataset, in that order.
    Runs without a perplexity (NaN) take no part."""
    runs = table[(table["allocation"] != "dense") & table["ppl"].notna()]
    rows = []
    for (sparsity, pruner, dataset), group in runs.groupby(["sparsity", "pruner", "dataset"]):
        head = f"{plain_number(100 * sparsity)}% {pruner_label(pruner)}, {dataset_label(dataset)}"
        ppl = dict(zip(group["allocation"], group["ppl"].astype(float), strict=True))
        rows.append((head, verdict(ppl, recommended)))
    return rows


def verdicts(table: pd.DataFrame, recommended: str | None = None) -> list[str]:
    """One verdict line per target sparsity, pruner and dataset of a summary table, e.g.
    "50% Wanda, wikitext2: svnup-fit best at 60.55, 12.4% below uniform, ..."."""
    return [f"{head}: {text}" for head, text in _verdict_rows(table, recommended)]


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _perplexity_table(table: pd.DataFrame) -> str:
    """The perplexity of every run, one column per target sparsity; the best (and tied) value of
    each target, pruner and dataset in bold."""
    pivot = table.pivot_table(
        index=["dataset", "pruner", "allocation"], columns="sparsity", values="ppl"
    )
    cells = pivot.map(lambda x: "-" if pd.isna(x) else f"{x:.3f}")
    pruned = pivot[pivot.index.get_level_values("allocation") != "dense"]
    for _, group in pruned.groupby(level=["dataset", "pruner"]):
        for column in group:
            best = group[column].min()
            for row in group.index[(1 - best / group[column]) < TIE]:
                cells.loc[row, column] = f"<b>{cells.loc[row, column]}</b>"
    cells.index = cells.index.map(
        lambda row: (
            html.escape(row[0]),
            html.escape(pruner_label(row[1])),
            allocation_label(row[2]),
        )
    )
    return cells.to_html(escape=False)


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


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
    "img{max-width:100%}td,th{padding:2px 8px;text-align:right}"
    "ul.verdicts{font-size:1.1em;line-height:1.5}p.note{color:#555;font-style:italic}"
)


def _verdict_section(table: pd.DataFrame, recommended: str | None, note: str | None) -> list[str]:
    lines = [
        f"<li><b>{html.escape(head)}</b>: {html.escape(text)}</li>"
        for head, text in _verdict_rows(table, recommended)
    ]
    parts = ["<ul class='verdicts'>", *lines, "</ul>"] if lines else []
    if recommended is not None:
        parts.append(
            f"<p>Recommended allocation (the model's <code>allocation.method</code>): "
            f"<b>{html.escape(allocation_label(recommended))}</b>.</p>"
        )
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    return parts


def make_report(
    results: Path,
    out_dir: Path,
    summary: Path,
    shapley: Path | None,
    budgets: list[Path],
    recommended: str | None = None,
    note: str | None = None,
) -> Path:
    """Write shapley.png, sparsity.png, perplexity.png and report.html under ``out_dir``.

    ``recommended`` is the allocation method the model is configured with (drawn distinctly);
    ``note`` a sentence on what the run can and cannot show, printed under the verdicts.
    """
    from svnup.io import read_scores

    if recommended is not None and recommended not in ALLOCATIONS:
        raise ValueError(
            f"recommended allocation '{recommended}' is not a registered method; "
            f"give one of {', '.join(ALLOCATIONS)}"
        )
    out_dir = Path(out_dir)
    table = pd.read_csv(summary)
    plot_perplexity(table, out_dir / "perplexity.png", recommended)
    sections = []
    if budgets:
        plot_sparsity([read_budget(p) for p in budgets], out_dir / "sparsity.png", recommended)
        sections += ["<h2>Per-block sparsity</h2>", _img(out_dir / "sparsity.png")]
    if shapley is not None:
        values, stderr, meta = read_scores(shapley)
        values = np.asarray(values, dtype=float)
        stderr = np.array([np.nan if e is None else e for e in stderr])
        players = meta.get("players")
        title = f"{results.name}: {'block' if players is None else 'half-block'} importance"
        plot_shapley(values, stderr, out_dir / "shapley.png", title, players)
        sections += ["<h2>Per-block Shapley values</h2>", _img(out_dir / "shapley.png")]
    page = "\n".join(
        [
            "<!doctype html><meta charset='utf-8'>",
            f"<title>svnup report: {html.escape(results.name)}</title>",
            f"<style>{STYLE}</style>",
            f"<h1>svnup: {html.escape(results.name)}</h1>",
            *_verdict_section(table, recommended, note),
            "<h2>Perplexity</h2>",
            _img(out_dir / "perplexity.png"),
            _perplexity_table(table),
            *_zero_shot_section(table),
            *sections,
        ]
    )
    target = out_dir / "report.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target
