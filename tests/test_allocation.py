"""Sparsity allocation: exact parameter-weighted mean, bounds, monotonicity, OWL outliers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svnup.allocation import (
    allocate,
    block_outlier_density,
    outlier_counts,
    owl_allocation,
    score_allocation,
    svnup_allocation,
    uniform_allocation,
)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    finite = {"allow_nan": False, "allow_infinity": False}
    params = np.array(draw(st.lists(st.floats(1.0, 1e10, **finite), min_size=n, max_size=n)))
    scores = np.array(draw(st.lists(st.floats(-1e6, 1e6, **finite), min_size=n, max_size=n)))
    target = draw(st.floats(0.01, 0.99))
    lo = draw(st.floats(0.0, target))
    hi = draw(st.floats(target, 1.0))
    lam = draw(st.floats(0.0, 1.0))
    return scores, params, target, lam, (lo, hi)


def weighted_mean(sparsity: np.ndarray, params: np.ndarray) -> float:
    return float(np.average(sparsity, weights=params))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(problems())
def test_weighted_mean_bounds_and_monotonicity(problem):
    scores, params, target, lam, (lo, hi) = problem
    sparsity = score_allocation(scores, params, target, lam, (lo, hi))
    assert sparsity.dtype == np.float64 and sparsity.shape == scores.shape
    assert abs(weighted_mean(sparsity, params) - target) <= 1e-9
    assert ((sparsity >= lo) & (sparsity <= hi)).all()
    order = np.argsort(scores, kind="stable")
    assert (np.diff(sparsity[order]) <= 0).all(), "a higher score must not raise sparsity"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(problems())
def test_lam_zero_and_uniform(problem):
    scores, params, target, _, bounds = problem
    uniform = uniform_allocation(params, target, bounds)
    np.testing.assert_array_equal(uniform, np.full(len(params), target))
    np.testing.assert_allclose(
        score_allocation(scores, params, target, 0.0, bounds), uniform, atol=1e-12
    )
    np.testing.assert_allclose(allocate("uniform", params=params, target=target), target)


def test_hand_examples():
    # z = [0, 1] -> density 0.5 -/+ 0.2 -> sparsity [0.7, 0.3]; mean already 0.5 with equal sizes.
    np.testing.assert_allclose(svnup_allocation([1.0, 3.0], [1, 1], 0.5), [0.7, 0.3])
    # A 3:1 size ratio gives mean 0.6, so both shift down by 0.1.
    np.testing.assert_allclose(svnup_allocation([1.0, 3.0], [3, 1], 0.5), [0.6, 0.2])
    # The least important block hits the upper bound; the other three absorb the rest.
    sparsity = score_allocation([0, 1, 1, 1], np.ones(4), 0.9, 0.2, (0.0, 0.95))
    np.testing.assert_allclose(sparsity, [0.95, 2.65 / 3, 2.65 / 3, 2.65 / 3])
    # Equal scores (z = 0.5) and equal sizes leave every block at the target.
    np.testing.assert_allclose(svnup_allocation([2.0, 2.0, 2.0], [1, 5, 9], 0.6), 0.6)


def test_owl_direction_and_range():
    lod = np.array([0.01, 0.05, 0.02, 0.08])
    sparsity = owl_allocation(lod, np.ones(4), 0.5)
    assert np.argmin(sparsity) == np.argmax(lod) and np.argmax(sparsity) == np.argmin(lod)
    assert (np.diff(sparsity[np.argsort(lod)]) < 0).all()
    assert sparsity.max() - sparsity.min() == pytest.approx(2 * 0.08)
    assert sparsity.mean() == pytest.approx(0.5, abs=1e-12)


def test_allocate_dispatch_and_defaults():
    params, importance = np.array([4.0, 1.0, 2.0]), np.array([0.3, -0.1, 0.9])
    kw = {"params": params, "target": 0.6}
    np.testing.assert_array_equal(
        allocate("svnup", importance=importance, **kw), svnup_allocation(importance, params, 0.6)
    )
    np.testing.assert_array_equal(
        allocate("loo", importance=importance, lam=0.1, **kw),
        score_allocation(importance, params, 0.6, 0.1),
    )
    np.testing.assert_array_equal(
        allocate("owl", outlier_density=importance, **kw),
        score_allocation(importance, params, 0.6, 0.08),
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: uniform_allocation([1, 1], 0.0), r"sparsity must be in \(0, 1\)"),
        (lambda: score_allocation([1, 2], [1, 1], 1.0, 0.1), r"sparsity must be in \(0, 1\)"),
        (lambda: allocate("owl", params=[1], target=-0.2, outlier_density=[1]), "sparsity"),
        (lambda: score_allocation([1, 2], [1, 1], 0.5, 0.1, (0.6, 0.9)), "bounds"),
        (lambda: score_allocation([1, 2], [1, 1], 0.5, 0.1, (0.0, 0.4)), "bounds"),
        (lambda: score_allocation([1, 2], [1, 1], 0.5, 0.1, (0.7, 0.3)), "bounds"),
        (lambda: score_allocation([1, 2], [1, 1], 0.5, -0.1), "lam"),
        (lambda: score_allocation([1, 2, 3], [1, 1], 0.5, 0.1), "scores"),
        (lambda: score_allocation([1, np.nan], [1, 1], 0.5, 0.1), "scores"),
        (lambda: uniform_allocation([1, 0], 0.5), "params"),
        (lambda: uniform_allocation([], 0.5), "params"),
        (lambda: allocate("random", params=[1], target=0.5), "svnup.*owl.*uniform.*loo"),
        (lambda: allocate("svnup", params=[1], target=0.5), "importance"),
        (lambda: allocate("owl", params=[1], target=0.5), "outlier_density"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_outlier_counts_by_hand():
    # |W| * col_norm = [[1, 0], [0, 10]]: mean 2.75, threshold 5.5 at m = 2.
    assert outlier_counts(np.array([[1.0, 0.0], [0.0, -10.0]]), np.ones(2), m=2) == (1, 4)
    # col_norm scales columns: scores [[1, 1, 10], [1, 1, 10]], mean 4, threshold 8.
    weight, col_norm = np.ones((2, 3)), np.array([1.0, 1.0, 10.0])
    assert outlier_counts(weight, col_norm, m=2) == (2, 6)
    assert outlier_counts(weight, col_norm, m=3) == (0, 6)
    assert outlier_counts(torch.ones(2, 3, dtype=torch.float16), torch.tensor(col_norm), m=2) == (
        2,
        6,
    )
    pairs = [(np.array([[1.0, 0.0], [0.0, -10.0]]), np.ones(2)), (weight, col_norm)]
    assert block_outlier_density(pairs, m=2) == pytest.approx(3 / 10)


def test_outlier_errors():
    with pytest.raises(ValueError, match="col_norm"):
        outlier_counts(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="m "):
        outlier_counts(np.ones((2, 3)), np.ones(3), m=0)
    with pytest.raises(ValueError, match="layers"):
        block_outlier_density([])


def test_no_torch_import():
    code = "import sys, svnup.allocation; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
