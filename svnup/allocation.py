"""Per-block sparsity allocation: the map from per-block scores to per-block sparsities.

Every mapping returns one sparsity per block whose *parameter-weighted* mean is exactly the target
within the bounds, so non-uniform and uniform pruning remove the same number of weights and stay
comparable. Published allocators centre their ratios with an unweighted mean; that equals the
weighted one when blocks have equal size (every model svnup supports), and the exact shift is
harmless otherwise. The scores come from elsewhere (Shapley values, dense-model metrics, a search);
``svnup.registry.ALLOCATIONS`` says which mapping each method uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Bounds = tuple[float, float]


def _check_target(target: float, bounds: Bounds) -> tuple[float, float, float]:
    target = float(target)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target}")
    lo, hi = (float(b) for b in bounds)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"bounds must satisfy 0 <= lo <= hi <= 1, got {bounds}")
    if not lo <= target <= hi:
        raise ValueError(f"bounds {bounds} cannot average to target sparsity {target}; widen them")
    return target, lo, hi


def _check_params(params: np.ndarray) -> np.ndarray:
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 1 or params.size == 0:
        raise ValueError(f"params must be a non-empty 1-D array of block sizes, got {params.shape}")
    if not np.all(np.isfinite(params) & (params > 0)):
        raise ValueError("params must be finite and positive (parameter count per block)")
    return params


def _check_scores(scores: np.ndarray, params: np.ndarray, key: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != params.shape:
        raise ValueError(f"{key} has shape {scores.shape} but params has {params.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{key} must be finite")
    return scores


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not lam >= 0.0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return lam


def fit_mean(
    base: np.ndarray, slope: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float
) -> np.ndarray:
    """clip(base + c * slope, lo, hi) whose weighted mean is ``target`` (every slope > 0).

    The weighted mean is continuous, non-decreasing and piecewise linear in c, with kinks where a
    block hits a bound, so c lies between two adjacent kinks and follows by interpolation. A
    constant slope shifts the sparsities; a slope equal to them scales them.
    """
    kinks = np.unique(np.concatenate([(lo - base) / slope, (hi - base) / slope]))
    means = np.clip(base[None, :] + kinks[:, None] * slope[None, :], lo, hi) @ weights
    k = int(np.searchsorted(means, target))
    if k == 0 or k == kinks.size or means[k] == target:
        c = kinks[min(k, kinks.size - 1)]
    else:
        frac = (target - means[k - 1]) / (means[k] - means[k - 1])
        c = kinks[k - 1] + frac * (kinks[k] - kinks[k - 1])
    return np.clip(base + c * slope, lo, hi)


def _shift_to_mean(
    sparsity: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float
) -> np.ndarray:
    """clip(sparsity + c, lo, hi) whose weighted mean is ``target``."""
    return fit_mean(sparsity, np.ones_like(sparsity), weights, target, lo, hi)


def _min_max(scores: np.ndarray) -> np.ndarray:
    """Scores mapped onto [0, 1]; all equal scores map to 0.5."""
    span = scores.max() - scores.min()
    return (scores - scores.min()) / span if span > 0 else np.full(scores.shape, 0.5)


def _inputs(scores, params, target, bounds) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    params = _check_params(params)
    scores = _check_scores(scores, params, "scores")
    target, lo, hi = _check_target(target, bounds)
    return scores, params / params.sum(), target, lo, hi


def uniform_allocation(
    scores: None, params: np.ndarray, target: float, bounds: Bounds = (0.0, 0.99)
) -> np.ndarray:
    """The same sparsity for every block: the baseline every non-uniform method is compared with."""
    params = _check_params(params)
    target, _, _ = _check_target(target, bounds)
    return np.full(params.shape, target)


def linear_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    lam: float = 0.2,
) -> np.ndarray:
    """Density (1 - S) + lam * (2z - 1) for min-max normalised scores z (higher score, denser),
    shifted by the one constant that makes the parameter-weighted mean sparsity exactly S.

    With equal block sizes and no bound hit this is OWL's map: a 2 * lam wide density range
    centred on the target density by its mean (SV-NUP, leave-one-out and OWL use it).
    """
    scores, weights, target, lo, hi = _inputs(scores, params, target, bounds)
    density = (1.0 - target) + _check_lam(lam) * (2.0 * _min_max(scores) - 1.0)
    return _shift_to_mean(1.0 - density, weights, target, lo, hi)


def dlp_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    alpha: float = 0.15,
) -> np.ndarray:
    """DLP: a block's importance is 1 - m_b / sum(m) for its mean Wanda score m_b, mapped like OWL
    with half-width alpha. That importance is a decreasing affine function of m_b, so its min-max
    normalisation is that of -m_b: blocks with smaller Wanda scores stay denser."""
    return linear_allocation(-np.asarray(scores, dtype=np.float64), params, target, bounds, alpha)


def alphapruning_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    epsilon: float = 0.3,
) -> np.ndarray:
    """AlphaPruning: min-max normalised heavy-tail exponents mapped into [1 - eps, 1 + eps] and
    scaled so the parameter-weighted mean is S; a larger alpha (a less heavy-tailed, less trained
    spectrum) means a sparser block. Where the scaled ratios leave the bounds, the scale is
    re-solved so the clipped sparsities keep the exact mean (the reference does not clip)."""
    scores, weights, target, lo, hi = _inputs(scores, params, target, bounds)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"alphapruning epsilon must be in [0, 1), got {epsilon}")
    ratio = (1.0 - epsilon) + 2.0 * epsilon * _min_max(scores)
    return fit_mean(np.zeros_like(ratio), ratio, weights, target, lo, hi)


def offset_allocation(
    scores: np.ndarray, params: np.ndarray, target: float, bounds: Bounds = (0.0, 0.99)
) -> np.ndarray:
    """S + scores: per-block sparsity offsets around the target (ATP's arithmetic progression
    beta * (b - (L - 1) / 2)), shifted to the exact weighted mean within the bounds."""
    scores, weights, target, lo, hi = _inputs(scores, params, target, bounds)
    return _shift_to_mean(target + scores, weights, target, lo, hi)


# LSA's half-width beta by target, indexed by int(10 * target) as the reference's table is; below
# 10% the reference takes its --Lamda (default 0.08), and it has no entry from 90% up. Its
# per-projection allocation (lsac) reads no table: it takes --Lamda at every target.
LSA_BETAS = (0.08, 0.06, 0.02, 0.04, 0.02, 0.04, 0.1, 0.15, 0.12)
LSA_PROJECTION_BETA = 0.08


def lsa_beta(target: float, granularity: str = "block") -> float:
    """The reference's beta for ``target``: by block 0.04 at 50%, 0.1 at 60%, 0.15 at 70%; by
    projection 0.08 (its --Lamda default) at every target."""
    if granularity == "projection":
        return LSA_PROJECTION_BETA
    index = int(target * 10)
    if not 0 <= index < len(LSA_BETAS):
        raise ValueError(
            f"LSA's reference has no beta for target sparsity {target} (its table ends below "
            f"{len(LSA_BETAS) / 10:g}); set allocation.lsa.beta"
        )
    return LSA_BETAS[index]


def lsa_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    beta: float | None = None,
    granularity: str = "block",
) -> np.ndarray:
    """LSA: each player's (block's or linear layer's) zeroing error, min-max normalised to z and
    mapped to an importance 2 beta (1 - z); a player prunes (mean importance - its importance)
    x the mean player's weights more than the target's share, so a larger error means a sparser
    player, the weighted mean is exact and, with players of equal size, the sparsity is
    S + mean(imp) - imp (the reference's block map). ``beta`` None is
    ``lsa_beta(target, granularity)``.
    """
    scores, weights, target, lo, hi = _inputs(scores, params, target, bounds)
    beta = lsa_beta(target, granularity) if beta is None else float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"lsa beta must be in [0, 1], got {beta}")
    importance = 2.0 * beta * (1.0 - _min_max(scores))
    sizes = np.asarray(params, dtype=np.float64)
    sparsity = target + (importance.mean() - importance) * sizes.mean() / sizes
    return _shift_to_mean(sparsity, weights, target, lo, hi)


DAMAGE_CURVATURES = np.geomspace(0.5, 50.0, 400)


def fit_damage(damage: np.ndarray, levels: np.ndarray) -> tuple[float, np.ndarray]:
    """Least-squares fit of damage[k, b] ~ a_b * exp(c * levels[k]): one curvature c shared by
    every block (how fast damage grows with sparsity) and one scale a_b per block.

    For a given c the scales are linear least squares in closed form, so c is chosen on a
    log-spaced grid. Returns (c, a); a scale can come out <= 0 when a block's measured damage is
    noise around zero.
    """
    damage = np.asarray(damage, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    if damage.ndim != 2 or damage.shape[0] != levels.size or levels.size < 2:
        raise ValueError(
            f"damage must be a [levels, blocks] table with at least 2 levels, got {damage.shape} "
            f"for levels {levels.tolist()}"
        )
    if not (np.all(np.diff(levels) > 0) and levels[0] > 0 and levels[-1] < 1):
        raise ValueError(f"levels must increase within (0, 1), got {levels.tolist()}")
    if not np.all(np.isfinite(damage)):
        raise ValueError("damage must be finite")
    curves = np.exp(np.outer(DAMAGE_CURVATURES, levels))  # [grid, levels]
    scales = (curves @ damage) / (curves**2).sum(axis=1, keepdims=True)  # [grid, blocks]
    residual = ((damage[None] - curves[:, :, None] * scales[:, None, :]) ** 2).sum(axis=(1, 2))
    best = int(np.argmin(residual))
    return float(DAMAGE_CURVATURES[best]), scales[best]


def damage_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    levels: np.ndarray | None = None,
    floor: float = 0.05,
) -> np.ndarray:
    """Sparsities that minimise the predicted damage sum_b a_b exp(c s_b) at the exact weighted
    mean, from per-block damage ``scores[k, b]`` measured at sparsities ``levels[k]``.

    With the fitted model (``fit_damage``) the optimum equalises the marginal damage per pruned
    weight, a_b c exp(c s_b) = mu w_b, so s_b = K + (ln w_b - ln a_b) / c: sparsity falls with the
    log of a block's damage scale, by as much as the measured curvature says, and K makes the
    weighted mean exact within the bounds. Scales below ``floor`` x the median positive scale
    (blocks whose damage is lost in the noise) are raised to it, so no block is pruned on noise
    alone.
    """
    if levels is None:
        raise ValueError("damage allocation needs the levels its damage was measured at")
    params = _check_params(params)
    damage = np.asarray(scores, dtype=np.float64)
    if damage.ndim != 2 or damage.shape[1] != params.size:
        raise ValueError(f"scores must be a [levels, {params.size}] table, got {damage.shape}")
    target, lo, hi = _check_target(target, bounds)
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    curvature, scale = fit_damage(damage, np.asarray(levels, dtype=np.float64))
    if not np.any(scale > 0):
        raise ValueError(
            "no block's fitted damage is positive: the probe levels are too low to measure damage "
            "on this evaluation set; raise the levels or the evaluation samples"
        )
    scale = np.maximum(scale, floor * np.median(scale[scale > 0]))
    weights = params / params.sum()
    return _shift_to_mean((np.log(weights) - np.log(scale)) / curvature, weights, target, lo, hi)


def type_curves(
    damage: np.ndarray, levels: np.ndarray, floor: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Each layer type's own damage curve a_t exp(c_t s) (``fit_damage`` of its column alone)
    from a [level, type] table of the type game (each type pruned in every block at once).

    Scales below ``floor`` x the median positive scale are raised to it, as ``damage_allocation``
    does for blocks, so a type whose damage is noise is not pruned on noise alone."""
    damage = np.asarray(damage, dtype=np.float64)
    if damage.ndim != 2 or damage.shape[1] < 1:
        raise ValueError(f"type damage must be a [levels, types] table, got {damage.shape}")
    fits = [fit_damage(damage[:, [t]], levels) for t in range(damage.shape[1])]
    curvatures = np.array([c for c, _ in fits])
    scales = np.array([float(a[0]) for _, a in fits])
    if not np.any(scales > 0):
        raise ValueError(
            "no layer type's fitted damage is positive: the probe levels are too low to measure "
            "damage on this evaluation set; raise the levels or the evaluation samples"
        )
    return curvatures, np.maximum(scales, floor * np.median(scales[scales > 0]))


def split_at_equal_marginal(
    mean: float,
    params: np.ndarray,
    curvatures: np.ndarray,
    scales: np.ndarray,
    bounds: Bounds = (0.0, 0.99),
) -> np.ndarray:
    """The sparsities of one player's linear layers, weighted mean exactly ``mean``, that
    minimise sum_t a_t exp(c_t s_t) for each layer's type curve (c_t, a_t).

    At the optimum the marginal damage per pruned weight is equal, a_t c_t exp(c_t s_t) = mu w_t,
    so s_t = ln(w_t / (a_t c_t)) / c_t + ln(mu) / c_t: linear in ln mu with slope 1 / c_t, which
    ``fit_mean`` solves exactly within the bounds. A common factor of the scales (the type game
    sums a type's damage over every block) only moves mu."""
    params = _check_params(params)
    lo, hi = (float(b) for b in bounds)
    if not lo <= mean <= hi:
        raise ValueError(f"a player's sparsity {mean} lies outside the bounds {bounds}")
    curvatures, scales = (np.asarray(v, dtype=np.float64) for v in (curvatures, scales))
    if not (np.all(curvatures > 0) and np.all(scales > 0)):
        raise ValueError("type curves need positive curvatures and scales")
    weights = params / params.sum()
    base = np.log(weights / (scales * curvatures)) / curvatures
    return fit_mean(base, 1.0 / curvatures, weights, mean, lo, hi)


def atp_grid(n_blocks: int, target: float, step: float) -> list[float]:
    """ATP's candidate common differences: step, 2 * step, ... while every block of the
    progression S + beta * (b - (L - 1) / 2) stays within [0, 1]."""
    if n_blocks < 2:
        raise ValueError(
            "ATP needs a model with at least 2 blocks (its progression runs over depth)"
        )
    limit = min(2 * target, 2 * (1 - target)) / (n_blocks - 1)
    grid = []
    while round((len(grid) + 1) * step, 12) <= limit:
        grid.append(round((len(grid) + 1) * step, 12))
    if not grid:
        raise ValueError(
            f"allocation.atp.step {step} exceeds the largest common difference {limit:.5f} that "
            f"keeps {n_blocks} blocks within [0, 1] at sparsity {target}; lower the step"
        )
    return grid


def unimodal_argmin(loss: Callable[[int], float], n: int) -> int:
    """Index of the smallest of loss(0), ..., loss(n - 1), by golden-section search.

    Exact for a unimodal sequence (falling, then rising) in O(log n) calls; ``loss`` is called at
    most once per index.
    """
    cache: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in cache:
            cache[i] = loss(i)
        return cache[i]

    lo, hi = 0, n - 1
    while hi - lo > 3:
        left = lo + round((hi - lo) * 0.382)
        right = max(lo + round((hi - lo) * 0.618), left + 1)
        if at(left) <= at(right):
            hi = right
        else:
            lo = left
    return min(range(lo, hi + 1), key=at)


def allocate(
    method: str,
    scores: np.ndarray | None,
    params: np.ndarray,
    target: float,
    bounds: Bounds = (0.0, 0.99),
    levels: list[float] | None = None,
    **method_params: float,
) -> np.ndarray:
    """Per-block sparsities of allocation ``method`` (a name in ``svnup.registry.ALLOCATIONS``).

    ``levels`` are the sparsities at which a [level, block] table of scores was measured.
    """
    from svnup.registry import ALLOCATIONS, choices, resolve

    if method not in ALLOCATIONS:
        raise ValueError(
            f"unknown allocation method {method!r}; choose one of {choices(ALLOCATIONS)}"
        )
    entry = ALLOCATIONS[method]
    if entry.source is not None and entry.source.kind != "types" and scores is None:
        raise ValueError(f"allocation method {method!r} needs per-block scores")
    unknown = set(method_params) - set(entry.mapping_params)
    if unknown:
        raise ValueError(
            f"allocation method {method!r} takes {list(entry.mapping_params)}, "
            f"not {sorted(unknown)}"
        )
    arguments = {entry.params[name].argument or name: v for name, v in method_params.items()}
    if levels is not None:
        arguments["levels"] = np.asarray(levels, dtype=np.float64)
    return resolve(entry.mapping)(scores, params, target, bounds, **arguments)
