"""Per-layer pruning kernels: magnitude, Wanda and SparseGPT masks for one ``nn.Linear`` weight.

Every kernel returns a bool mask shaped like the weight, True where a weight is pruned (set to
zero). Unstructured masks prune exactly ``round(sparsity * in_features)`` weights in every output
row, so a layer's sparsity is exact and non-uniform allocations across layers add up as planned.
N:M masks prune ``n`` weights in every group of ``m`` consecutive input columns of a row. Scores
and updates are computed in float32 on the weight's device whatever the weight's dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LayerStats",
    "magnitude_mask",
    "parse_nm",
    "sparsegpt_prune",
    "wanda_mask",
]


class LayerStats:
    """Input statistics of one ``nn.Linear`` accumulated over calibration tokens.

    ``col_norm_sq`` (sum of x_j^2 over tokens) is all Wanda needs; the Hessian ``2/n X X^T`` that
    SparseGPT needs costs in_features^2 floats, so it is only kept when ``hessian=True``. The
    Hessian is a running mean, so its scale does not grow with the number of calibration tokens.
    """

    def __init__(
        self, in_features: int, *, hessian: bool, device: torch.device | str = "cpu"
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.device = torch.device(device)
        self.n_tokens = 0
        self.col_norm_sq = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self.hessian: torch.Tensor | None = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
            if hessian
            else None
        )

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Fold the tokens of ``inputs`` ([..., in_features], any float dtype) into the stats."""
        if inputs.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"inputs must have shape [..., {self.in_features}], got {tuple(inputs.shape)}"
            )
        x = inputs.detach().reshape(-1, self.in_features).to(self.device, torch.float32)
        new = x.shape[0]
        if new == 0:
            return
        self.col_norm_sq += x.square().sum(dim=0)
        total = self.n_tokens + new
        if self.hessian is not None:
            # H_total = (n_old * H_old + 2 X^T X) / n_total, without ever un-normalising H_old.
            self.hessian *= self.n_tokens / total
            x = x * math.sqrt(2.0 / total)
            self.hessian += x.T @ x
        self.n_tokens = total


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """Parse an N:M pattern such as ``"2:4"`` (n zeros per m columns); None means unstructured."""
    if pattern is None:
        return None
    parts = str(pattern).strip().split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"nm pattern must look like 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}"
    )


def _check(weight: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """Validate the arguments shared by all kernels and return the effective sparsity."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"nm must be (n, m) with 0 < n < m, got {nm!r}")
        if weight.shape[1] % m:
            raise ValueError(
                f"nm {n}:{m} needs in_features divisible by {m}, got {weight.shape[1]}"
            )
        if sparsity is not None and not math.isclose(sparsity, n / m, abs_tol=1e-9):
            raise ValueError(f"sparsity {sparsity!r} contradicts nm {n}:{m}; pass {n / m} or None")
        return n / m
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest scores along the last dim (stable, so ties break towards low index)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.argsort(scores, dim=-1, stable=True)[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def _mask_from_scores(
    scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Per-row (or per N:M group) lowest-score mask of a [out, in] float32 score matrix."""
    rows, cols = scores.shape
    if nm is None:
        return _lowest(scores, round(sparsity * cols))
    n, m = nm
    return _lowest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Prune the smallest |W| in every output row (or in every N:M group)."""
    sparsity = _check(weight, sparsity, nm)
    return _mask_from_scores(weight.detach().float().abs(), sparsity, nm)


def wanda_mask(
    weight: torch.Tensor,
    col_norm_sq: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda (Sun et al. 2023): prune the lowest |W_ij| * ||X_j|| within each output row."""
    sparsity = _check(weight, sparsity, nm)
    if col_norm_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"col_norm_sq must have shape [{weight.shape[1]}] (the weight's in_features), "
            f"got {tuple(col_norm_sq.shape)}"
        )
    norms = col_norm_sq.detach().to(weight.device, torch.float32).sqrt()
    return _mask_from_scores(weight.detach().float().abs() * norms, sparsity, nm)


def _upper_inverse_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U); modifies ``hessian``."""
    diag = torch.diagonal(hessian)
    diag += percdamp * diag.mean()
    try:
        factor = torch.linalg.cholesky(hessian)
        factor = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"hessian is not positive definite after damping with percdamp={percdamp}; "
            "use more calibration tokens or a larger percdamp"
        ) from err
    return factor


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune W and update the rest to keep W X unchanged.

    Columns are processed left to right in lazy blocks of ``blocksize``. Within a block each pruned
    weight's error is spread over the block's later columns with the OBS update, and the block's
    accumulated error is pushed to all later columns in one matrix product. Scores are
    w^2 / U_jj^2 with U the upper Cholesky factor of the dampened H^-1.

    Mask choice departs from the reference, which thresholds scores over a whole block and so lets
    rows end up with different sparsities: here each output row picks its own lowest scores in a
    block, with a cumulative quota so that columns [0, c) of every row hold exactly
    round(sparsity * c) pruned weights at each block end c. Every row therefore ends with exactly
    round(sparsity * in_features) pruned weights, the same guarantee as the other kernels. N:M
    masks are chosen every m columns inside the block from the already-updated weights, as in the
    paper; ``blocksize`` is rounded up to a multiple of m so groups never straddle blocks.

    Input columns the calibration data never excited (H_jj == 0) are zeroed in the returned
    weight (they cannot affect the calibration output); they score 0, so the mask takes them first,
    but beyond a row's quota they are zeros the mask does not count. Sparsity 0 returns an
    unchanged copy of ``weight``.

    Returns the updated weight (in ``weight.dtype``) and the pruned mask.
    """
    sparsity = _check(weight, sparsity, nm)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape [{cols}, {cols}], got {tuple(hessian.shape)}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    if sparsity == 0:
        return weight.detach().clone(), mask
    if nm is not None:
        blocksize = -(-blocksize // nm[1]) * nm[1]

    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(weight.device, torch.float32, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _upper_inverse_factor(h, percdamp)

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        block_diag = torch.diagonal(block_hinv)
        errors = torch.zeros_like(block)
        if nm is None:
            quota = round(sparsity * end) - round(sparsity * start)
            block_mask = _lowest(block.square() / block_diag.square(), quota)
        else:
            block_mask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                scores = block[:, group].square() / block_diag[group].square()
                block_mask[:, group] = _lowest(scores, nm[0])
            pruned = torch.where(block_mask[:, j], block[:, j], 0.0)
            err = pruned / block_diag[j]
            # OBS: zeroing w_j is compensated by adding -w_j / U_jj * U_j,k to each later column k.
            block[:, j + 1 :] -= err.unsqueeze(1) * block_hinv[j, j + 1 :].unsqueeze(0)
            block[:, j] -= pruned
            errors[:, j] = err
        w[:, start:end] = block
        mask[:, start:end] = block_mask
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype), mask
