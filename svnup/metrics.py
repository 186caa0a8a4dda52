"""Per-block metrics of the dense model that published allocators map to sparsities.

Each function scores one decoder block from ``layers = {name: (weight, statistic)}``, where the
statistic of a linear layer is what its metric reads (``svnup.registry.METRICS``): ``col_norm_sq``,
the sum over calibration tokens of each squared input feature, the Hessian ``2/n X^T X`` of its
inputs, or None for metrics of the weights alone. The statistics come from the dense model, as in
the reference code, which propagates the calibration data through unpruned blocks. Scale does not
matter: every allocation made from these metrics is invariant to a common factor on the
statistics, so normalising by tokens (svnup) or by sequences (the references) gives the same
sparsities. A metric returns one score per block, or one per linear layer (a dict by layer name).
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


def lsa_zeroing_error(
    weight: torch.Tensor, hessian: torch.Tensor, fraction: float = 0.5, group: int = 128
) -> float:
    """LSA's reconstruction error of a linear layer: the output error ||X (W - W')^T||^2 (up to
    the Hessian's scale) when each row zeroes ``fraction`` of every group of ``group`` input
    columns, the columns chosen greedily and nothing else updated.

    Zeroing a set S of a row's weights costs w_S^T H_SS w_S. Greedily, each row adds the column
    whose marginal cost w_j^2 H_jj + 2 w_j sum_{k in S} w_k H_kj is lowest, ``int(fraction * g)``
    times within each group of g columns, left to right, with the columns zeroed in earlier
    groups part of S; the sum of the marginal costs is the layer's error. As in the reference, a
    group takes ``int(fraction * group)`` columns; a shorter last group (or a layer narrower than
    ``group``) takes ``int(fraction * its width)``, where the reference would take more columns
    than it has. Arithmetic is float32, as there; the sum is accumulated in float64.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"lsa fraction must be in (0, 1), got {fraction}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"lsa group must be a positive integer, got {group!r}")
    w = weight.detach().float()
    h = hessian.detach().to(w.device, torch.float32)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"hessian must have shape [{cols}, {cols}], got {tuple(h.shape)}")
    every_row = torch.arange(rows, device=w.device)
    marginal = w.square() * torch.diagonal(h)  # the cost of zeroing each weight alone
    total = 0.0
    for start in range(0, cols, group):
        end = min(start + group, cols)
        cost, kept = marginal[:, start:end], w[:, start:end]  # views: updates reach ``marginal``
        zeroed = torch.zeros_like(kept)
        for _ in range(int(fraction * (end - start))):
            column = cost.argmin(dim=1)
            total += float(cost[every_row, column].double().sum())
            value = kept[every_row, column]
            cost += 2.0 * kept * value.unsqueeze(1) * h[start + column, start:end]
            cost[every_row, column] = torch.inf
            zeroed[every_row, column] = value
        if end < cols:
            marginal[:, end:] += 2.0 * w[:, end:] * (zeroed @ h[start:end, end:])
    return total


def lsa_error(
    layers: Layers, granularity: str = "block", fraction: float = 0.5, group: int = 128
) -> float | dict[str, float]:
    """LSA's score of a block from ``{name: (weight, hessian)}``: the mean of its linear layers'
    zeroing errors (``lsa_zeroing_error``), or with ``granularity: projection`` each layer's."""
    errors = {
        name: lsa_zeroing_error(weight, hessian, fraction, group)
        for name, (weight, hessian) in layers.items()
    }
    if granularity == "projection":
        return errors
    if granularity != "block":
        raise ValueError(f"lsa granularity must be block or projection, got {granularity!r}")
    return sum(errors.values()) / len(errors)
