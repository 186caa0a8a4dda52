"""The report reads at a glance: a verdict line per target, pruner and dataset that names the best
allocation and its margins, the recommended method drawn distinctly, and plain tick labels."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import yaml
from workflow_fixture import REPO

from svnup import config as cfg
from svnup.cli import main
from svnup.io import write_json, write_scores
from svnup.report import make_report, plain_ticks, plot_perplexity, plot_sparsity, verdict, verdicts


def test_the_winner_is_named_with_its_margin_to_uniform_and_to_the_best_published():
    ppl = {"svnup-fit": 60.55, "uniform": 69.12, "atp": 67.13, "owl": 70.0, "svnup": 62.0}
    assert verdict(ppl) == (
        "svnup-fit best at 60.55, 12.4% below uniform, "
        "9.8% below ATP (the best published allocator here)"
    )


def test_a_published_winner_is_said_plainly():
    ppl = {"svnup": 62.0, "uniform": 64.0, "alphapruning": 61.0, "dlp": 61.5}
    assert verdict(ppl) == (
        "AlphaPruning best at 61.00, 4.7% below uniform, "
        "1.6% below svnup (the best svnup method here); a published allocator is best here"
    )


def test_a_uniform_winner_is_said_plainly():
    ppl = {"uniform": 50.0, "svnup": 51.0, "owl": 52.0}
    assert verdict(ppl) == (
        "uniform best at 50.00, 3.8% below OWL (the best published allocator here), "
        "2.0% below svnup (the best svnup method here); no allocation beats uniform here"
    )


def test_margins_that_would_print_as_zero_are_ties():
    """Within 0.05% two allocations tie (named in registry order); from 0.05% on one wins."""
    assert verdict({"owl": 60.01, "svnup": 60.0, "uniform": 65.0}) == (
        "svnup and OWL tie at 60.00, 7.7% below uniform"
    )
    assert verdict({"owl": 60.04, "svnup": 60.0, "uniform": 65.0}) == (
        "svnup best at 60.00, 7.7% below uniform, "
        "0.1% below OWL (the best published allocator here)"
    )
    assert verdict({"uniform": 60.0, "loo": 60.0, "svnup": 60.0}) == (
        "svnup, loo and uniform tie at 60.00, no published allocator in this run; "
        "no allocation beats uniform here"
    )


def test_missing_baselines_are_named():
    assert verdict({"svnup": 60.0, "uniform": 66.0}) == (
        "svnup best at 60.00, 9.1% below uniform, no published allocator in this run"
    )
    assert verdict({"svnup": 60.0, "owl": 61.0}) == (
        "svnup best at 60.00, no uniform run, 1.6% below OWL (the best published allocator here)"
    )
    assert verdict({"svnup": 60.0}) == "svnup at 60.00, the only allocation in this run"


def test_the_recommended_method_is_marked_where_it_wins():
    assert verdict({"svnup": 60.0, "uniform": 66.0}, recommended="svnup").startswith(
        "svnup (recommended) best at 60.00, 9.1% below uniform"
    )
    assert verdict({"svnup": 67.0, "owl": 68.0, "uniform": 66.0}, recommended="svnup") == (
        "uniform best at 66.00, 2.9% below OWL (the best published allocator here), "
        "1.5% below svnup (the best svnup method here); no allocation beats uniform here"
    )


def _summary(rows: list[tuple]) -> pd.DataFrame:
    columns = ["allocation", "pruner", "sparsity", "dataset", "ppl"]
    return pd.DataFrame(rows, columns=columns)


def test_one_verdict_per_target_pruner_and_dataset():
    table = _summary(
        [
            ("dense", "none", 0.0, "wikitext2", 10.0),
            ("dense", "none", 0.0, "/data/held.jsonl", 12.0),
            *[
                (allocation, pruner, sparsity, dataset, ppl + 10 * sparsity + (pruner == "wanda"))
                for allocation, ppl in (("svnup", 20.0), ("owl", 21.0), ("uniform", 22.0))
                for pruner in ("wanda", "sparsegpt")
                for sparsity in (0.5, 0.7)
                for dataset in ("wikitext2", "/data/held.jsonl")
            ],
            ("atp", "wanda", 0.5, "wikitext2", float("nan")),  # a run without a perplexity
        ]
    )
    lines = verdicts(table)
    heads = [line.split(":")[0] for line in lines]
    assert heads == [
        f"{s}% {p}, {d}"
        for s in (50, 70)
        for p in ("SparseGPT", "Wanda")
        for d in ("held.jsonl", "wikitext2")
    ]
    assert lines[2] == (
        "50% Wanda, held.jsonl: svnup best at 26.00, 7.1% below uniform, "
        "3.7% below OWL (the best published allocator here)"
    )
    assert "ATP" not in "".join(lines)


def _line_widths(fig) -> dict[str, float]:
    return {
        line.get_label(): line.get_linewidth()
        for ax in fig.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def _legend_texts(fig) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def test_figures_draw_the_recommended_method_thick_and_labelled(tmp_path):
    table = _summary(
        [
            ("dense", "none", 0.0, "wikitext2", 10.0),
            *[
                (allocation, "wanda", sparsity, "wikitext2", ppl * (1 + sparsity))
                for allocation, ppl in (("svnup-fit", 20.0), ("atp", 21.0), ("uniform", 22.0))
                for sparsity in (0.5, 0.6)
            ],
        ]
    )
    fig = plot_perplexity(table, tmp_path / "ppl.png", recommended="svnup-fit")
    widths = _line_widths(fig)
    assert set(widths) == {"svnup-fit (recommended)", "ATP", "uniform", "dense"}
    assert widths["svnup-fit (recommended)"] > 2 * max(widths["ATP"], widths["uniform"])
    assert _legend_texts(fig)[0] == "svnup-fit (recommended)"

    two_pruners = pd.concat([table, table[table["pruner"] == "wanda"].assign(pruner="sparsegpt")])
    fig = plot_perplexity(two_pruners, tmp_path / "ppl.png", recommended="svnup-fit")
    assert _legend_texts(fig) == [
        "svnup-fit (recommended)",
        "ATP",
        "uniform",
        "dense",
        "SparseGPT",
        "Wanda",
    ]
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines()[:-1]}
    assert len(styles) == 2  # one per pruner, the allocation's colour on both

    budgets = [
        {"target": target, "spec": {"method": method}, "sparsities": [target] * 4}
        for target in (0.5, 0.6)
        for method in ("uniform", "owl", "svnup")
    ]
    fig = plot_sparsity(budgets, tmp_path / "sparsity.png", recommended="svnup")
    assert _legend_texts(fig) == ["svnup (recommended)", "OWL", "uniform"]
    widths = _line_widths(fig)
    assert widths["svnup (recommended)"] > 2 * widths["OWL"]

    fig = plot_sparsity(budgets, tmp_path / "sparsity.png")
    assert not any("recommended" in text for text in _legend_texts(fig))


def _tick_labels(ax) -> list[str]:
    """The labels of the y ticks in view."""
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    texts = (*ax.get_yticklabels(), *ax.get_yticklabels(minor=True))
    return [t.get_text() for t in texts if t.get_text() and low <= t.get_position()[1] <= high]


@pytest.mark.parametrize("limits", [(84, 96), (257.3, 258.45), (0.8, 1500), (0.004, 0.3)])
def test_log_axes_have_plain_tick_labels(limits):
    """Plain numbers where matplotlib writes powers of ten; within one decade, where ticks
    between powers are labelled, all with the same decimals."""
    fig, ax = plt.subplots()
    ax.plot([0, 1], limits)
    ax.set_yscale("log")
    ax.set_ylim(*limits)
    assert any("10^" in label for label in _tick_labels(ax)), "matplotlib's default changed"
    plain_ticks(ax)
    labels = _tick_labels(ax)
    assert len(labels) >= 2 and all(re.fullmatch(r"\d+(\.\d+)?", x) for x in labels), labels
    if limits[1] < 10 * limits[0]:
        assert len({len(x.partition(".")[2]) for x in labels}) == 1, labels
    plt.close(fig)


def test_log_axes_over_decades_label_the_powers():
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.set_ylim(0.8, 1500)
    plain_ticks(ax)
    assert _tick_labels(ax) == ["1", "10", "100", "1000"]
    plt.close(fig)


def test_linear_axes_have_no_offset_or_multiplier():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1000.0001, 1000.0004])
    plain_ticks(ax)
    labels = _tick_labels(ax)
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert all(label.startswith("1000.000") for label in labels), labels
    plt.close(fig)


def _inputs(tmp_path):
    summary = tmp_path / "summary.csv"
    _summary(
        [
            ("dense", "none", 0.0, "wikitext2", 10.0),
            ("svnup", "wanda", 0.5, "wikitext2", 20.0),
            ("uniform", "wanda", 0.5, "wikitext2", 22.0),
        ]
    ).to_csv(summary, index=False)
    budget = tmp_path / "budget.json"
    plan = {"target": 0.5, "achieved": 0.5, "spec": {"method": "svnup"}, "sparsities": [0.4, 0.6]}
    write_json(budget, plan | {"block_params": [10, 10], "importance": [1, 0], "scores": [1, 0]})
    shapley = tmp_path / "scores.json"
    write_scores(shapley, [0.1, -0.2], [0.01, None])
    return summary, budget, shapley


def test_the_page_opens_with_the_verdicts_and_the_note(tmp_path):
    summary, budget, shapley = _inputs(tmp_path)
    results = tmp_path / "model"
    note = "A tiny random model: it can't rank <allocations>."
    args = ["--results", str(results), "--out-dir", str(results / "report"), "--summary"]
    args += [str(summary), "--shapley", str(shapley), "--budgets", str(budget)]
    assert main(["report", *args, "--recommended", "svnup", "--note", note]) == 0
    page = (results / "report/report.html").read_text()
    line = "<b>50% Wanda, wikitext2</b>: svnup (recommended) best at 20.00, 9.1% below uniform"
    assert page.index(line) < page.index("<h2>Perplexity</h2>")
    assert "it can&#x27;t rank &lt;allocations&gt;." in page
    assert "<td><b>20.000</b></td>" in page and "<td>22.000</td>" in page

    assert main(["report", *args, "--note", ""]) == 0
    page = (results / "report/report.html").read_text()
    assert "recommended" not in page.lower() and "class='note'" not in page


def test_an_unknown_recommended_method_is_one_line(tmp_path):
    summary, _, _ = _inputs(tmp_path)
    with pytest.raises(ValueError, match="recommended allocation 'best' is not a registered"):
        make_report(tmp_path, tmp_path / "report", summary, None, [], recommended="best")
    assert not (tmp_path / "report").exists()


def test_a_models_note_is_a_string_and_never_part_of_a_cache_key():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    plain = cfg.for_pruner(cfg.model_settings(config, "demo"), "wanda")
    config["models"]["demo"]["note"] = "A demo: it shows the workflow, not the best allocation."
    cfg.validate(config)
    noted = cfg.for_pruner(cfg.model_settings(config, "demo"), "wanda")
    assert noted["note"].startswith("A demo")
    for spec in (cfg.calibration_spec, cfg.store_spec, cfg.shapley_spec, cfg.model_spec):
        assert cfg.key(spec(noted)) == cfg.key(spec(plain))
    assert cfg.key(cfg.prune_spec(noted, "svnup", 0.5, "wanda")) == cfg.key(
        cfg.prune_spec(plain, "svnup", 0.5, "wanda")
    )
    config["models"]["demo"]["note"] = 5
    with pytest.raises(cfg.ConfigError, match=r"config key 'models\.demo\.note'"):
        cfg.validate(config)
