"""Shapley-value estimators over decoder blocks.

The players are the L decoder blocks. A coalition is named by the bitmask of *ablated* blocks
(a Python int, bit i = block i ablated, so any L works); the game's value of the dense set
D = N \\ A comes from a callable ``value(ablated_mask)``. A block's Shapley value is its average
marginal contribution when it is made dense. Every estimator first lists the masks it needs
(``coalitions``), so a caller can evaluate them in bulk, then combines them (``estimate``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import comb
from numbers import Integral
from typing import Protocol

import numpy as np

MAX_EXACT_BLOCKS = 20

Value = Callable[[int], float]


@dataclass(frozen=True, eq=False)
class ShapleyResult:
    """Per-block values, standard errors where the estimator has them, cost in coalitions."""

    values: np.ndarray
    stderr: np.ndarray | None
    n_coalitions: int


class Estimator(Protocol):
    name: str
    n_blocks: int

    def coalitions(self) -> list[int]: ...

    def estimate(self, value: Value) -> ShapleyResult: ...


def _check_count(n: object, key: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {n!r}")
    return int(n)


def _evaluate(value: Value, masks: Iterable[int]) -> dict[int, float]:
    """Call the game once per distinct coalition."""
    return {mask: float(value(mask)) for mask in masks}


def _shapley_weights(n: int) -> np.ndarray:
    """|S|!(n-|S|-1)!/n! for |S| = 0..n-1, as 1 / (n * C(n-1, |S|)) to avoid huge factorials."""
    return np.array([1.0 / (n * comb(n - 1, k)) for k in range(n)])


def _popcount(idx: np.ndarray, n: int) -> np.ndarray:
    counts = np.zeros_like(idx)
    for bit in range(n):
        counts += (idx >> bit) & 1
    return counts


def exact_shapley(table: np.ndarray) -> np.ndarray:
    """Exact Shapley values from a table over all 2^n ablated masks of n players.

    ``table[a]`` is the value when the players in bitmask ``a`` are ablated. Reversing the table
    indexes it by the dense mask instead (dense = full ^ ablated = full - ablated), after which a
    player's value is a weighted sum of the marginals v(S | i) - v(S) over all S without i.
    """
    table = np.asarray(table, dtype=np.float64)
    n = table.size.bit_length() - 1
    if table.ndim != 1 or n < 1 or table.size != 1 << n:
        raise ValueError(f"table must hold 2^n values for n >= 1 players, got shape {table.shape}")
    dense_value = table[::-1]
    idx = np.arange(1 << n, dtype=np.int64)
    size, weight = _popcount(idx, n), _shapley_weights(n)
    values = np.empty(n)
    for i in range(n):
        without = idx[(idx >> i) & 1 == 0]
        marginal = dense_value[without | (1 << i)] - dense_value[without]
        values[i] = weight[size[without]] @ marginal
    return values


class Exact:
    """All 2^L coalitions: the ground truth, affordable only for small L."""

    name = "exact"

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = _check_count(n_blocks, "n_blocks")
        if self.n_blocks > MAX_EXACT_BLOCKS:
            raise ValueError(
                f"exact Shapley needs 2^{self.n_blocks} coalitions; it is limited to n_blocks <= "
                f"{MAX_EXACT_BLOCKS}: use 'swsv' or 'permutation' for larger models"
            )

    def coalitions(self) -> list[int]:
        return list(range(1 << self.n_blocks))

    def estimate(self, value: Value) -> ShapleyResult:
        masks = self.coalitions()
        table = np.array([float(value(mask)) for mask in masks])
        return ShapleyResult(exact_shapley(table), None, len(masks))


def sliding_windows(n_blocks: int, width: int, stride: int = 1) -> list[tuple[int, int]]:
    """[start, end) windows of ``width`` consecutive blocks every ``stride`` blocks.

    A final window aligned to the last block is added when the stride would leave blocks uncovered.
    """
    n_blocks = _check_count(n_blocks, "n_blocks")
    width = _check_count(width, "swsv.width")
    stride = _check_count(stride, "swsv.stride")
    if width > n_blocks:
        raise ValueError(
            f"swsv.width={width} exceeds n_blocks={n_blocks}; use a width <= {n_blocks}"
        )
    if stride > width:
        raise ValueError(
            f"swsv.stride={stride} exceeds swsv.width={width}, which would skip blocks; "
            f"use a stride <= the width"
        )
    windows = [(start, start + width) for start in range(0, n_blocks - width + 1, stride)]
    if windows[-1][1] != n_blocks:
        windows.append((n_blocks - width, n_blocks))
    return windows


class SlidingWindow:
    """Sliding-window Shapley (SWSV): exact Shapley inside each window of consecutive blocks.

    Blocks outside the window stay dense, so the cost is about (#windows) * 2^width coalitions
    instead of 2^L. A block's value is its mean over the windows that contain it; the spread across
    those windows (sample std / sqrt(count)) is its standard error, NaN if only one window has it.
    """

    name = "swsv"

    def __init__(self, n_blocks: int, width: int = 4, stride: int = 1) -> None:
        self.n_blocks = _check_count(n_blocks, "n_blocks")
        self.windows = sliding_windows(self.n_blocks, width, stride)
        if width > MAX_EXACT_BLOCKS:
            raise ValueError(
                f"swsv.width={width} needs 2^{width} coalitions per window; "
                f"use a width <= {MAX_EXACT_BLOCKS}"
            )
        self.width = int(width)
        self.stride = int(stride)

    def window_coalitions(self, start: int, end: int) -> list[int]:
        """Every ablated mask within blocks [start, end), indexed by the window-local mask."""
        return [local << start for local in range(1 << (end - start))]

    def coalitions(self) -> list[int]:
        return sorted(
            {mask for start, end in self.windows for mask in self.window_coalitions(start, end)}
        )

    def estimate(self, value: Value) -> ShapleyResult:
        cache = _evaluate(value, self.coalitions())
        per_block: list[list[float]] = [[] for _ in range(self.n_blocks)]
        for start, end in self.windows:
            table = np.array([cache[mask] for mask in self.window_coalitions(start, end)])
            for offset, phi in enumerate(exact_shapley(table)):
                per_block[start + offset].append(float(phi))
        values = np.array([np.mean(v) for v in per_block])
        stderr = np.array(
            [np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.nan for v in per_block]
        )
        return ShapleyResult(values, stderr, len(cache))


class Permutation:
    """Monte Carlo Shapley over random orders in which blocks are made dense.

    With ``antithetic`` each drawn order is paired with its reverse (negatively correlated
    marginals, so lower variance); ``n_permutations`` counts every order evaluated.
    """

    name = "permutation"

    def __init__(
        self, n_blocks: int, n_permutations: int = 64, seed: int = 0, antithetic: bool = True
    ) -> None:
        self.n_blocks = _check_count(n_blocks, "n_blocks")
        n_permutations = _check_count(n_permutations, "permutation.n_permutations")
        if antithetic and n_permutations % 2:
            raise ValueError(
                f"permutation.n_permutations={n_permutations} must be even when antithetic=True "
                f"(orders come in pairs)"
            )
        self.antithetic = bool(antithetic)
        rng = np.random.default_rng(seed)
        n_draw = n_permutations // 2 if antithetic else n_permutations
        drawn = np.array([rng.permutation(self.n_blocks) for _ in range(n_draw)])
        # Row 2k+1 reverses row 2k, so pairs are adjacent rows.
        self.permutations = (
            np.stack([drawn, drawn[:, ::-1]], axis=1).reshape(-1, self.n_blocks)
            if antithetic
            else drawn
        )

    def _prefix_masks(self, order: np.ndarray) -> list[int]:
        """Ablated masks as the blocks of ``order`` become dense one by one (all ablated first)."""
        ablated = (1 << self.n_blocks) - 1
        masks = [ablated]
        for block in order:
            ablated &= ~(1 << int(block))
            masks.append(ablated)
        return masks

    def coalitions(self) -> list[int]:
        return sorted({mask for order in self.permutations for mask in self._prefix_masks(order)})

    def estimate(self, value: Value) -> ShapleyResult:
        cache = _evaluate(value, self.coalitions())
        marginals = np.empty(self.permutations.shape)
        for row, order in enumerate(self.permutations):
            prefix_values = np.array([cache[mask] for mask in self._prefix_masks(order)])
            marginals[row, order] = np.diff(prefix_values)
        if self.antithetic:
            marginals = marginals.reshape(-1, 2, self.n_blocks).mean(axis=1)
        n = marginals.shape[0]
        stderr = (
            marginals.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(self.n_blocks, np.nan)
        )
        return ShapleyResult(marginals.mean(axis=0), stderr, len(cache))


class LeaveOneOut:
    """v(N) - v(N \\ {i}): the loss from ablating one block alone (a baseline, not Shapley)."""

    name = "loo"

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = _check_count(n_blocks, "n_blocks")

    def coalitions(self) -> list[int]:
        return [0] + [1 << i for i in range(self.n_blocks)]

    def estimate(self, value: Value) -> ShapleyResult:
        cache = _evaluate(value, self.coalitions())
        values = np.array([cache[0] - cache[1 << i] for i in range(self.n_blocks)])
        return ShapleyResult(values, None, len(cache))


ESTIMATORS: dict[str, type] = {
    "exact": Exact,
    "swsv": SlidingWindow,
    "permutation": Permutation,
    "loo": LeaveOneOut,
}


def make_estimator(name: str, n_blocks: int, **params: object) -> Estimator:
    """Build an estimator from its config name and parameters."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown shapley estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    try:
        inspect.signature(cls).bind(n_blocks, **params)
    except TypeError:
        allowed = [p for p in inspect.signature(cls).parameters if p != "n_blocks"]
        raise ValueError(
            f"unknown parameters {sorted(params)} for shapley estimator {name!r}; "
            f"it takes {allowed}"
        ) from None
    return cls(n_blocks, **params)


def coalition_jobs(estimator: Estimator) -> dict[str, list[int]]:
    """Split the coalitions an estimator needs into independent jobs, each coalition in one job.

    SWSV gets one job per window, named by its block range; a coalition shared by overlapping
    windows belongs to the first of them, so concurrent jobs never evaluate it twice. Other
    estimators are a single job.
    """
    if not isinstance(estimator, SlidingWindow):
        return {estimator.name: estimator.coalitions()}
    jobs: dict[str, list[int]] = {}
    assigned: set[int] = set()
    for start, end in estimator.windows:
        owned = [m for m in estimator.window_coalitions(start, end) if m not in assigned]
        assigned.update(owned)
        jobs[f"window-{start:03d}-{end:03d}"] = owned
    return jobs
