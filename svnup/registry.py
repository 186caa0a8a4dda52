"""What can be plugged in, by the names the config uses: pruners, block metrics, allocation methods.

The config schema's enums, the Snakemake wildcard constraints, the CLI and the stages all read these
tables, so adding a method is one entry here plus its kernel, metric or mapping. Implementations are
named by import path and loaded on first use: reading the tables (the Snakefile does at every
invocation) never imports torch. Estimators live in ``svnup.shapley.ESTIMATORS`` (numpy only).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a method: its default, its JSON-schema bounds and what it does."""

    default: Any
    schema: dict[str, Any]
    help: str
    argument: str | None = None  # the mapping's keyword, where the config key is not a valid one
    # added after results were cached: enters a cache key only when set to another value than
    # its default, so the keys of configurations that leave it alone do not change
    optional: bool = False


@dataclass(frozen=True)
class Pruner:
    """A per-layer pruning kernel. ``statistics`` is what it needs from each layer's calibration
    inputs: None, ``col_norm`` (summed squared inputs per column) or ``hessian`` (2/n X X^T).
    ``rewrites``: it also changes the weights it keeps (else it only zeroes, and a mask says
    all it did)."""

    statistics: str | None
    kernel: str
    reference: str
    label: str  # how reports name it
    rewrites: bool = False


@dataclass(frozen=True)
class Metric:
    """A score of the dense model, from its weights and (if ``statistics``) each linear layer's
    calibration inputs: None, ``col_norm`` (summed squared inputs per column, from the calibration
    record) or ``hessian`` (2/n X^T X, from a pass over the calibration tokens).
    ``function(layers, **params)`` gets ``{name: (weight, statistic or None)}`` for one block and
    returns its score, or a dict of one score per linear layer (each layer is then a player)."""

    function: str
    statistics: str | None
    reference: str


@dataclass(frozen=True)
class Source:
    """Where an allocation method's per-block scores come from.

    ``kind`` is ``shapley`` (a Shapley stage; ``name`` is the estimator, None for the configured
    one), ``levels`` (the same at each of the probe sparsities in the method's ``levels``, as one
    [level, block] table), ``types`` (no per-block scores: the type game at each of the
    method's ``levels``, which splits players at the target between their linear layers),
    ``metric`` (a Metric of the dense model) or ``search`` (a search over allocations for one
    target and pruner). ``params`` names the method's parameters that the
    scores depend on; the others only affect the mapping from scores to sparsities. A search
    with ``database`` reads the linear layers pruned at levels around its target (the levels
    stage), which depend on the calibration, the pruner and these of its parameters.
    """

    kind: str
    name: str | None = None
    params: tuple[str, ...] = ()
    database: tuple[str, ...] = ()


@dataclass(frozen=True)
class Allocation:
    """A way to turn per-block scores into per-block sparsities with an exact weighted mean.

    ``mapping(scores, params, target, bounds, **mapping_params)`` is in ``svnup.allocation``;
    ``mapped`` names the parameters of the scores that the mapping reads too.
    """

    source: Source | None
    mapping: str
    params: dict[str, Param] = field(default_factory=dict)
    reference: str = ""
    published: str | None = None  # a published allocator's name in its paper; None: svnup's own
    mapped: tuple[str, ...] = ()

    @property
    def mapping_params(self) -> tuple[str, ...]:
        shared = self.source.params if self.source else ()
        return tuple(name for name in self.params if name not in shared or name in self.mapped)


def _half_width(default: float, argument: str | None = "lam") -> Param:
    return Param(
        default,
        {"type": "number", "minimum": 0, "maximum": 1},
        "half-width of the per-block density range around the target density",
        argument,
    )


PRUNERS: dict[str, Pruner] = {
    "magnitude": Pruner(
        None,
        "svnup.pruning:prune_magnitude",
        "magnitude baseline of the SparseGPT and Wanda repositories: one |W| threshold per matrix",
        "magnitude",
    ),
    "wanda": Pruner(
        "col_norm",
        "svnup.pruning:prune_wanda",
        "Wanda (Sun et al., ICLR 2024; locuslab/wanda): |W| * ||x|| per output row",
        "Wanda",
    ),
    "sparsegpt": Pruner(
        "hessian",
        "svnup.pruning:prune_sparsegpt",
        "SparseGPT (Frantar & Alistarh, ICML 2023; IST-DASLab/sparsegpt)",
        "SparseGPT",
        rewrites=True,
    ),
}

METRICS: dict[str, Metric] = {
    "owl": Metric(
        "svnup.metrics:owl_outlier_ratio",
        statistics="col_norm",
        reference="OWL (Yin et al., ICML 2024; luuyin/OWL): layerwise outlier distribution",
    ),
    "dlp": Metric(
        "svnup.metrics:dlp_mean_score",
        statistics="col_norm",
        reference="DLP (Chen et al., ICML 2025, arXiv 2505.23807; ironartisan/DLP)",
    ),
    "alphapruning": Metric(
        "svnup.metrics:alphapruning_alpha",
        statistics=None,
        reference="AlphaPruning (Lu et al., NeurIPS 2024; haiquanlu/AlphaPruning): alpha_peak",
    ),
    "lsa": Metric(
        "svnup.metrics:lsa_error",
        statistics="hessian",
        reference="LSA (Yang et al., ICLR 2026; BeiYazi0/LSA): least error of zeroing half the "
        "inputs",
    ),
}


def _levels() -> Param:
    schema = {
        "type": "array",
        "minItems": 2,
        "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    }
    return Param(
        [0.6, 0.7, 0.8],
        schema,
        "probe sparsities at which the damage (of every player, or layer type) is measured",
    )


def _floor() -> Param:
    return Param(
        0.05,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "smallest damage scale a block (or layer type) can have, as a fraction of the median",
    )


def _counts(default: list[int], help_text: str) -> Param:
    schema = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}}
    return Param(default, schema, help_text)


# EvoPress's parameters, with the reference's defaults (svnup.evopress says where svnup departs).
EVOPRESS: dict[str, Param] = {
    "probe_pruner": Param(
        "sparsegpt",
        {"enum": [*PRUNERS, "match"]},  # match: config.MATCH, each run's own pruner
        "pruner of the level database (match: each run's pruner)",
    ),
    "num_levels": Param(
        8, {"type": "integer", "minimum": 1}, "levels each side of the target: 17 in all"
    ),
    "weights_diff": Param(
        0.03459,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "weights one level step moves, as a fraction of the mean linear layer's weights "
        "(LLaMA-7B: 1,000,000)",
    ),
    "generations": Param(400, {"type": "integer", "minimum": 1}, "generations of the search"),
    "offspring": Param(64, {"type": "integer", "minimum": 1}, "offspring per generation"),
    "survivors": _counts([8, 2, 1], "candidates kept by each selection step"),
    "tokens": _counts([2048, 16384, 65536], "calibration tokens each selection step scores on"),
    "fitness": Param(
        "kl", {"enum": ["kl", "ppl"]}, "kl: KL divergence from the dense model; ppl: perplexity"
    ),
    "seed": Param(0, {"type": "integer", "minimum": 0}, "seed of the mutations and minibatches"),
    # svnup's own, beyond the reference (svnup.evopress)
    "start": Param(
        "uniform",
        {"enum": ["uniform", "svnup-fit"]},
        "allocation the search starts from: uniform (the reference's) or svnup-fit's for the "
        "same target and the database's pruner",
        optional=True,
    ),
    "patience": Param(
        None,
        {"type": ["integer", "null"], "minimum": 1},
        "stop after this many generations without improving the best fitness (null: run every "
        "generation, the reference's)",
        optional=True,
    ),
    "tolerance": Param(
        0.0,
        {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "relative fall of the best fitness that counts as an improvement (with patience)",
        optional=True,
    ),
}

ALLOCATIONS: dict[str, Allocation] = {
    "svnup": Allocation(
        Source("shapley"),
        "svnup.allocation:linear_allocation",
        {"lambda": _half_width(0.2)},
        "SV-NUP: Shapley value of each block (svnup's estimators), linear map",
    ),
    "svnup-fit": Allocation(
        Source("levels", params=("levels", "split")),
        "svnup.allocation:damage_allocation",
        {
            "levels": _levels(),
            "floor": _floor(),
            "split": Param(
                "none",
                {"enum": ["none", "types"]},
                "how a player's sparsity is split between its linear layers: none (all the "
                "same) or types (a game of layer types, each pruned in every block at once at "
                "each level, fits a damage curve per type; each player is split where its "
                "layers' marginal damages per weight meet; needs shapley.ablation: prune)",
                optional=True,
            ),
        },
        "svnup: Shapley damage at several probe sparsities, fitted a_b exp(c s), minimised",
    ),
    "svnup-types": Allocation(
        Source("types", params=("levels", "floor", "unit")),
        "svnup.allocation:uniform_allocation",
        {
            "levels": _levels(),
            "floor": _floor(),
            "unit": Param(
                "halves",
                {"enum": ["halves", "blocks"]},
                "what keeps the target before the split: each block's attention and MLP half "
                "(halves) or each whole block (blocks)",
            ),
        },
        "svnup, no coalition games: every half at the target, split between its linear layers "
        "by the type game's damage curves (svnup-fit's split: types without its across-block "
        "allocation)",
    ),
    "loo": Allocation(
        Source("shapley", "loo"),
        "svnup.allocation:linear_allocation",
        {"lambda": _half_width(0.2)},
        "leave-one-out importance (one coalition per block), the SV-NUP map",
    ),
    "owl": Allocation(
        Source("metric", "owl", params=("m",)),
        "svnup.allocation:linear_allocation",
        {
            "m": Param(5.0, {"type": "number", "exclusiveMinimum": 0}, "outlier threshold, x mean"),
            "lambda": _half_width(0.08),
        },
        METRICS["owl"].reference,
        published="OWL",
    ),
    "dlp": Allocation(
        Source("metric", "dlp"),
        "svnup.allocation:dlp_allocation",
        {"alpha": _half_width(0.15, argument=None)},
        METRICS["dlp"].reference,
        published="DLP",
    ),
    "alphapruning": Allocation(
        Source("metric", "alphapruning"),
        "svnup.allocation:alphapruning_allocation",
        {
            "epsilon": Param(
                0.3,
                {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "ratios are mapped into [1 - epsilon, 1 + epsilon] x target",
            )
        },
        METRICS["alphapruning"].reference,
        published="AlphaPruning",
    ),
    "atp": Allocation(
        Source("search", "atp", params=("step", "strategy")),
        "svnup.allocation:offset_allocation",
        {
            "step": Param(
                0.002,
                {"type": "number", "exclusiveMinimum": 0, "maximum": 0.1},
                "grid step of the common difference beta",
            ),
            "strategy": Param(
                "golden",
                {"enum": ["golden", "grid"]},
                "golden: golden-section search of the grid (a unimodal loss); grid: all of it",
            ),
        },
        "ATP (Huang et al., ICML 2025; wzhuang-xmu/ATP): arithmetic progression over depth",
        published="ATP",
    ),
    "evopress": Allocation(
        Source(
            "search",
            "evopress",
            params=tuple(EVOPRESS),
            database=("num_levels", "weights_diff"),
        ),
        "svnup.allocation:offset_allocation",
        EVOPRESS,
        "EvoPress (Sieberling et al., ICML 2025; IST-DASLab/EvoPress): evolutionary search over "
        "the SparseGPT level of every linear layer",
    ),
    "lsa": Allocation(
        Source("metric", "lsa", params=("granularity", "fraction", "group")),
        "svnup.allocation:lsa_allocation",
        {
            "granularity": Param(
                "block",
                {"enum": ["block", "projection"]},
                "block: one sparsity per block (the reference's lsa); projection: one per linear "
                "layer (its lsac)",
            ),
            "beta": Param(
                None,
                {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "half-width of the sparsity range; null: the reference's (by block: 0.04 at 50%, "
                "0.1 at 60%, 0.15 at 70%; by projection: 0.08)",
            ),
            "fraction": Param(
                0.5,
                {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "share of each group's input columns a row zeroes to measure the error",
            ),
            "group": Param(
                128, {"type": "integer", "minimum": 1}, "input columns per group of the error"
            ),
        },
        METRICS["lsa"].reference,
        mapped=("granularity",),  # beta null depends on it
    ),
    "uniform": Allocation(None, "svnup.allocation:uniform_allocation", {}, "the same sparsity"),
}


def resolve(path: str) -> Callable:
    """The function named ``module:attribute``."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def method_params(section: dict, method: str) -> dict[str, float]:
    """Parameters of allocation ``method``: registry defaults, overridden by its config section."""
    entry = ALLOCATIONS[method]
    given = section.get(method) or {}
    return {name: given.get(name, param.default) for name, param in entry.params.items()}


def keyed_params(method: str, values: dict, names) -> dict:
    """The parameters ``names`` of ``method`` that enter a cache key: each optional one only
    where ``values`` sets it to another value than its default."""
    params = ALLOCATIONS[method].params
    return {
        name: values[name]
        for name in names
        if not (params[name].optional and values[name] == params[name].default)
    }


def choices(table: dict) -> str:
    return ", ".join(table)
