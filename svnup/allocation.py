"""Per-block sparsity allocation from block scores.

Every method returns one sparsity per block whose *parameter-weighted* mean is exactly the
target, so non-uniform and uniform pruning remove the same number of weights and stay comparable.
Scores (Shapley importance for SV-NUP, outlier density for OWL) are mapped linearly into
[S - lam, S + lam], higher score meaning denser, then shifted by the one constant that restores
the weighted mean after clipping to the bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def _shift_to_mean(
    sparsity: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float
) -> np.ndarray:
    """clip(sparsity + c, lo, hi) whose weighted mean is ``target``.

    The weighted mean is continuous, non-decreasing and piecewise linear in c, with kinks where a
    block hits a bound, so c lies between two adjacent kinks and follows by interpolation.
    """
    kinks = np.unique(np.concatenate([lo - sparsity, hi - sparsity]))
    means = np.clip(sparsity[None, :] + kinks[:, None], lo, hi) @ weights
    k = int(np.searchsorted(means, target))
    if k == 0 or k == kinks.size or means[k] == target:
        shift = kinks[min(k, kinks.size - 1)]
    else:
        frac = (target - means[k - 1]) / (means[k] - means[k - 1])
        shift = kinks[k - 1] + frac * (kinks[k] - kinks[k - 1])
    return np.clip(sparsity + shift, lo, hi)


def uniform_allocation(
    params: np.ndarray, target: float, bounds: Bounds = (0.0, 0.99)
) -> np.ndarray:
    """The same sparsity for every block: the baseline every non-uniform method is compared with."""
    params = _check_params(params)
    target, _, _ = _check_target(target, bounds)
    return np.full(params.shape, target)


def score_allocation(
    scores: np.ndarray,
    params: np.ndarray,
    target: float,
    lam: float,
    bounds: Bounds = (0.0, 0.99),
) -> np.ndarray:
    """Sparsity S - lam * (2z - 1) for min-max normalised scores z, shifted to the exact mean."""
    params = _check_params(params)
    scores = _check_scores(scores, params, "scores")
    target, lo, hi = _check_target(target, bounds)
    lam = _check_lam(lam)
    span = scores.max() - scores.min()
    z = (scores - scores.min()) / span if span > 0 else np.full(scores.shape, 0.5)
    density = (1.0 - target) + lam * (2.0 * z - 1.0)
    return _shift_to_mean(1.0 - density, params / params.sum(), target, lo, hi)


def svnup_allocation(
    importance: np.ndarray,
    params: np.ndarray,
    target: float,
    lam: float = 0.2,
    bounds: Bounds = (0.0, 0.99),
) -> np.ndarray:
    """SV-NUP: more important blocks (higher Shapley value) are pruned less."""
    return score_allocation(importance, params, target, lam, bounds)


def owl_allocation(
    outlier_density: np.ndarray,
    params: np.ndarray,
    target: float,
    lam: float = 0.08,
    bounds: Bounds = (0.0, 0.99),
) -> np.ndarray:
    """OWL: blocks with more activation-weighted outliers are pruned less.

    OWL centres its ratios with an unweighted mean; the shift here makes the weighted mean exact.
    """
    return score_allocation(outlier_density, params, target, lam, bounds)


def _to_numpy(x: Any) -> np.ndarray:
    """Accept torch tensors without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def outlier_counts(weight: Any, col_norm: Any, m: float = 5.0) -> tuple[int, int]:
    """(outliers, entries) of one linear layer: |W| * ||x_col|| above m times the layer mean.

    ``weight`` is [out, in]; ``col_norm`` is [in], the square root of the summed squared inputs.
    """
    if not m > 0:
        raise ValueError(f"m (outlier threshold multiple) must be > 0, got {m}")
    weight, col_norm = _to_numpy(weight), _to_numpy(col_norm)
    if weight.ndim != 2 or col_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"col_norm must have shape [in_features] = ({weight.shape[-1]},) for a 2-D weight, "
            f"got weight {weight.shape} and col_norm {col_norm.shape}"
        )
    scores = np.abs(weight) * col_norm[None, :]
    threshold = m * scores.mean(dtype=np.float64)
    return int(np.count_nonzero(scores > threshold)), int(scores.size)


def block_outlier_density(layers: Sequence[tuple[Any, Any]], m: float = 5.0) -> float:
    """Outlier density of a block: outliers over entries, pooled over its linear layers."""
    if not layers:
        raise ValueError("layers must list at least one (weight, col_norm) pair")
    counts = [outlier_counts(weight, col_norm, m) for weight, col_norm in layers]
    return sum(c for c, _ in counts) / sum(t for _, t in counts)


METHODS = ("svnup", "owl", "uniform", "loo")


def allocate(
    method: str,
    *,
    params: np.ndarray,
    target: float,
    lam: float | None = None,
    bounds: Bounds = (0.0, 0.99),
    importance: np.ndarray | None = None,
    outlier_density: np.ndarray | None = None,
) -> np.ndarray:
    """Dispatch on the config's method; ``loo`` is the SV-NUP mapping of LOO importance."""
    if method == "uniform":
        return uniform_allocation(params, target, bounds)
    if method in ("svnup", "loo"):
        if importance is None:
            raise ValueError(f"allocation method {method!r} needs importance (per-block scores)")
        return svnup_allocation(importance, params, target, 0.2 if lam is None else lam, bounds)
    if method == "owl":
        if outlier_density is None:
            raise ValueError("allocation method 'owl' needs outlier_density (per-block LOD)")
        return owl_allocation(outlier_density, params, target, 0.08 if lam is None else lam, bounds)
    raise ValueError(f"unknown allocation method {method!r}; choose one of {list(METHODS)}")
