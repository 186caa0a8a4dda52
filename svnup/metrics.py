"""Per-block metrics of the dense model that published allocators map to sparsities.

Each function scores one decoder block from ``layers = {name: (weight, col_norm_sq)}``, where
``col_norm_sq`` is the sum over calibration tokens of each squared input feature of that linear
layer (None for metrics of the weights alone). The statistics come from the dense model, as in the
reference code, which propagates the calibration data through unpruned blocks. Scale does not
matter: every metric here is invariant to a common factor on ``col_norm_sq``, so normalising by
tokens (svnup) or by sequences (the references) gives the same value.
"""

from __future__ import annotations

import torch

Layers = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def _wanda_scores(weight: torch.Tensor, col_norm_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||x_j||, the Wanda score of every weight, in float64 (one layer at a time)."""
    return weight.detach().double().abs() * col_norm_sq.to(weight.device, torch.float64).sqrt()


def _pooled_mean(layers: Layers) -> float:
    """Mean Wanda score over all weights of the block."""
    total = sum(float(_wanda_scores(w, c).sum()) for w, c in layers.values())
    return total / sum(weight.numel() for weight, _ in layers.values())


def owl_outlier_ratio(layers: Layers, m: float = 5.0) -> float:
    """OWL's layerwise outlier distribution: the percentage of the block's Wanda scores above m
    times their mean, with one threshold for all linear layers of the block together."""
    if not m > 0:
        raise ValueError(f"owl m (outlier threshold multiple) must be > 0, got {m}")
    threshold = m * _pooled_mean(layers)
    outliers = sum(
        int((_wanda_scores(weight, col_norm_sq) > threshold).sum())
        for weight, col_norm_sq in layers.values()
    )
    return 100.0 * outliers / sum(weight.numel() for weight, _ in layers.values())


def dlp_mean_score(layers: Layers) -> float:
    """DLP's block statistic: the mean Wanda score over all the block's weights."""
    return _pooled_mean(layers)


def _hill_alpha_at_peak(weight: torch.Tensor, bins: int = 100) -> float:
    """Power-law exponent of the empirical spectral density of W^T W (AlphaPruning's alpha_peak).

    The eigenvalues are the squared singular values. For every candidate lower cut-off x_min, the
    Hill estimator gives alpha = 1 + n / sum(log(lambda_i / x_min)) over the n eigenvalues at or
    above it, and the Kolmogorov-Smirnov distance of that fit is measured; the alpha with the
    smallest distance wins. Candidates stop above 1.5 x the peak of the log-spaced histogram. As
    in the reference implementation, the lower bound 0.95 x peak is compared on a log10 scale,
    which in practice keeps every small eigenvalue a candidate; we keep that to compute the
    published method. Arithmetic is float32, as there.
    """
    eigs = torch.linalg.svdvals(weight.detach().float().cpu()).square().sort().values
    n_eigs = eigs.numel()
    logs = eigs.log()
    log10 = eigs.log10()
    counts = torch.histc(log10, bins, min=float(log10.min()), max=float(log10.max()))
    edges = torch.linspace(float(log10.min()), float(log10.max()), bins + 1)
    peak = 10 ** edges[int(torch.argmax(counts))]
    lower, upper = torch.log10(0.95 * peak), 1.5 * peak
    alphas = torch.zeros(n_eigs - 1)
    distances = torch.ones(n_eigs - 1)
    for i in range(n_eigs - 1):
        x_min = eigs[i]
        if x_min < lower:
            continue
        if x_min > upper:
            break
        n = float(n_eigs - i)
        alpha = 1 + n / (logs[i:].sum() - n * logs[i])
        alphas[i] = alpha
        if alpha > 1:
            fitted = 1 - (eigs[i:] / x_min) ** (-alpha + 1)
            distances[i] = (fitted - torch.arange(n) / n).abs().max()
    return float(alphas[int(torch.argmin(distances))])


def alphapruning_alpha(layers: Layers) -> float:
    """AlphaPruning's block-wise metric: the mean alpha_peak of the block's linear layers."""
    alphas = [_hill_alpha_at_peak(weight) for weight, _ in layers.values()]
    return sum(alphas) / len(alphas)
