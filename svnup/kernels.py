"""Per-layer pruning kernels: magnitude, Wanda and SparseGPT masks for one ``nn.Linear`` weight.

Every kernel returns a bool mask shaped like the weight, True where a weight is pruned (set to
zero). Unstructured masks choose from the unit their method compares scores over: magnitude the
whole matrix, Wanda each output row, SparseGPT each block of ``blocksize`` columns over all rows.
Counts are ``round(sparsity * size_of_unit)`` (SparseGPT rounds cumulatively over its blocks), so
magnitude and SparseGPT prune exactly ``round(sparsity * numel)`` weights of a layer and Wanda
exactly ``round(sparsity * in_features)`` of every row; the rows of a magnitude or SparseGPT mask
differ. The reference code (SparseGPT and Wanda repositories) truncates instead: Wanda prunes
``floor(sparsity * in_features)`` per row, magnitude and SparseGPT every score at or below the
sorted one at index ``floor(sparsity * n)``, i.e. one more plus ties. Ties here go to the lower
(row-major) index. N:M masks prune ``n`` weights in every group of ``m`` consecutive input columns
of a row. Scores and updates are computed in float32 on the weight's device whatever the weight's
dtype.
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

    def pop_hessian(self) -> torch.Tensor:
        """Hand the Hessian over and forget it, e.g. to ``sparsegpt_prune``, which overwrites it."""
        if self.hessian is None:
            raise ValueError("these LayerStats keep no Hessian; create them with hessian=True")
        hessian, self.hessian = self.hessian, None
        return hessian


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


def _lowest_overall(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest scores of the whole tensor, ties towards the lower row-major index.

    A selection (kthvalue) rather than a full sort: several times faster on a SparseGPT block.
    """
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= flat.numel():
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing:
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.reshape(scores.shape)


def _nm_mask(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """The n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = scores.shape
    n, m = nm
    return _lowest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Prune the ``round(sparsity * numel)`` smallest |W| of the whole matrix (or per N:M group).

    One threshold per matrix, as the magnitude baseline of the SparseGPT and Wanda repositories,
    so rows end with different sparsities.
    """
    sparsity = _check(weight, sparsity, nm)
    scores = weight.detach().float().abs()
    if nm is not None:
        return _nm_mask(scores, nm)
    return _lowest_overall(scores, round(sparsity * scores.numel()))


def wanda_mask(
    weight: torch.Tensor,
    col_norm_sq: torch.Tensor,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda (Sun et al. 2023): prune the lowest |W_ij| * ||X_j|| within each output row.

    Every row prunes ``round(sparsity * in_features)`` weights where the reference truncates
    (``int(sparsity * in_features)``): the masks agree except for one more weight per row when
    the fractional part is >= 0.5, the row's next-lowest score.
    """
    sparsity = _check(weight, sparsity, nm)
    if col_norm_sq.shape != (weight.shape[1],):
        raise ValueError(
            f"col_norm_sq must have shape [{weight.shape[1]}] (the weight's in_features), "
            f"got {tuple(col_norm_sq.shape)}"
        )
    norms = col_norm_sq.detach().to(weight.device, torch.float32).sqrt()
    scores = weight.detach().float().abs() * norms
    if nm is not None:
        return _nm_mask(scores, nm)
    return _lowest(scores, round(sparsity * scores.shape[1]))


def _upper_inverse_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of the dampened H^-1 (H^-1 = U^T U); overwrites ``hessian``.

    Damping is ``percdamp * mean(diag H)`` with dead inputs (H_jj == 0) counting as 0. Their rows
    and columns of H are zero, so whatever their diagonal is set to (1 here, to keep H invertible)
    reaches neither the other columns nor their own scores (their weights are 0): the damping is
    the only place it could act. The reference sets it to 1 before averaging, a constant that is
    negligible against its per-sequence Hessian of a real model but not against a per-token one or
    small activations; counting dead inputs as 0 is that limit, and invariant to the scale of X.
    """
    diag = torch.diagonal(hessian)
    dead = diag == 0
    damp = percdamp * diag.mean()
    diag[dead] = 1.0
    diag += damp
    try:
        lower = torch.linalg.cholesky(hessian)
        torch.cholesky_inverse(lower, out=hessian)
        torch.linalg.cholesky(hessian, upper=True, out=lower)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"hessian is not positive definite after damping with percdamp={percdamp}; "
            "use more calibration tokens or a larger percdamp"
        ) from err
    return lower


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

    Columns are processed left to right in lazy blocks of ``blocksize``. At the start of a block
    its mask takes the lowest scores w^2 / U_jj^2 (U the upper Cholesky factor of the dampened
    H^-1) over all rows of the block's columns at once, as the reference ``fasterprune`` does, so
    rows end with different sparsities; the counts are rounded cumulatively, so the layer prunes
    exactly ``round(sparsity * numel)`` weights. Within a block each pruned weight's error is
    spread over the block's later columns with the OBS update, and the block's accumulated error
    is pushed to all later columns in one matrix product. N:M masks are chosen every m columns
    inside the block from the already-updated weights, as in the paper; ``blocksize`` is rounded
    up to a multiple of m so groups never straddle blocks.

    ``hessian`` is consumed: when it is float32 on the weight's device it is damped and factorised
    in place (no private copy of H) and holds garbage afterwards; pass a copy to keep it.
    Its scale does not matter (a per-token or per-sequence mean gives the same result).

    Input columns the calibration data never excited (H_jj == 0) are zeroed in the returned
    weight (they cannot affect the calibration output); they score 0, so the mask takes them first,
    but beyond a block's count they are zeros the mask does not count. Sparsity 0 returns an
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

    # Work on W^T so that a block of columns and each column are contiguous in memory.
    wt = weight.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    h = hessian.detach().to(weight.device, torch.float32)
    del hessian
    wt[torch.diagonal(h) == 0] = 0.0
    hinv = _upper_inverse_factor(h, percdamp)
    del h

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = wt[start:end]
        block_hinv = hinv[start:end, start:end]
        block_diag = torch.diagonal(block_hinv)
        errors = torch.empty_like(block)
        if nm is None:
            count = round(sparsity * rows * end) - round(sparsity * rows * start)
            scores = (block.square() / block_diag.square().unsqueeze(1)).T
            block_mask = _lowest_overall(scores, count).T.contiguous()
        else:
            block_mask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                scores = block[group].square() / block_diag[group].square().unsqueeze(1)
                block_mask[group] = _lowest(scores.T, nm[0]).T
            errors[j] = torch.where(block_mask[j], block[j], 0.0) / block_diag[j]
            # OBS: zeroing w_j is compensated by adding -w_j / U_jj * U_j,k to each column k > j.
            block[j + 1 :].addr_(block_hinv[j, j + 1 :], errors[j], alpha=-1)
        block.masked_fill_(block_mask, 0.0)
        mask[:, start:end] = block_mask.T
        wt[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)
    return wt.T.to(weight.dtype, memory_format=torch.contiguous_format), mask
