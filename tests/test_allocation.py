"""Sparsity allocation: exact parameter-weighted mean, bounds, monotonicity, OWL outliers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from svnup.allocation import (
    allocate,
    alphapruning_allocation,
    atp_grid,
    damage_allocation,
    dlp_allocation,
    fit_damage,
    linear_allocation,
    offset_allocation,
    uniform_allocation,
    unimodal_argmin,
)
from svnup.registry import ALLOCATIONS


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


MAPPINGS = {
    "linear": lambda scores, params, target, bounds, strength: linear_allocation(
        scores, params, target, bounds, lam=strength
    ),
    "dlp": lambda scores, params, target, bounds, strength: dlp_allocation(
        scores, params, target, bounds, alpha=strength
    ),
    "alphapruning": lambda scores, params, target, bounds, strength: alphapruning_allocation(
        scores, params, target, bounds, epsilon=min(strength, 0.99)
    ),
    "offset": lambda scores, params, target, bounds, strength: offset_allocation(
        strength * (scores - scores.mean()) / max(np.ptp(scores), 1e-300), params, target, bounds
    ),
}
# Direction of each mapping: +1 when a higher score means a denser block, -1 when sparser.
DIRECTION = {"linear": 1, "dlp": -1, "alphapruning": -1, "offset": -1}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(problems(), st.sampled_from(sorted(MAPPINGS)))
def test_weighted_mean_bounds_and_monotonicity(problem, mapping):
    scores, params, target, strength, (lo, hi) = problem
    sparsity = MAPPINGS[mapping](scores, params, target, (lo, hi), strength)
    assert sparsity.dtype == np.float64 and sparsity.shape == scores.shape
    assert abs(weighted_mean(sparsity, params) - target) <= 1e-9
    assert ((sparsity >= lo) & (sparsity <= hi)).all()
    order = np.argsort(DIRECTION[mapping] * scores, kind="stable")
    assert (np.diff(sparsity[order]) <= 1e-12).all(), "a denser score must not raise sparsity"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(problems())
def test_zero_strength_is_uniform(problem):
    scores, params, target, _, bounds = problem
    uniform = uniform_allocation(None, params, target, bounds)
    np.testing.assert_array_equal(uniform, np.full(len(params), target))
    for mapping in MAPPINGS.values():
        np.testing.assert_allclose(mapping(scores, params, target, bounds, 0.0), uniform, atol=1e-9)
    np.testing.assert_allclose(allocate("uniform", None, params, target), target)


def test_hand_examples():
    # z = [0, 1] -> density 0.5 -/+ 0.2 -> sparsity [0.7, 0.3]; mean already 0.5 with equal sizes.
    np.testing.assert_allclose(linear_allocation([1.0, 3.0], [1, 1], 0.5), [0.7, 0.3])
    # A 3:1 size ratio gives mean 0.6, so both shift down by 0.1.
    np.testing.assert_allclose(linear_allocation([1.0, 3.0], [3, 1], 0.5), [0.6, 0.2])
    # The least important block hits the upper bound; the other three absorb the rest.
    sparsity = linear_allocation([0, 1, 1, 1], np.ones(4), 0.9, (0.0, 0.95), lam=0.2)
    np.testing.assert_allclose(sparsity, [0.95, 2.65 / 3, 2.65 / 3, 2.65 / 3])
    # Equal scores (z = 0.5) and equal sizes leave every block at the target.
    np.testing.assert_allclose(linear_allocation([2.0, 2.0, 2.0], [1, 5, 9], 0.6), 0.6)
    # AlphaPruning with eps 0.5: ratios [0.5, 1.5] x 0.6 -> [0.3, 0.9]; 0.9 > 0.8 is clipped and
    # the scale re-solved: 0.8 + c * 0.5 = 1.2 -> [0.4, 0.8].
    np.testing.assert_allclose(
        alphapruning_allocation([1.0, 2.0], [1, 1], 0.6, (0.0, 0.8), epsilon=0.5), [0.4, 0.8]
    )


def owl_reference(outlier_ratio, target, lam):
    """luuyin/OWL lib/prune_all.py, unstructured: the ratios min-max mapped to a 2 * lambda wide
    density range, centred on the target density by their mean."""
    ratio = np.asarray(outlier_ratio, dtype=np.float64)
    ratio = (ratio - ratio.min()) * (1 / (ratio.max() - ratio.min()) * lam * 2)
    density = ratio - np.mean(ratio) + (1 - target)
    return 1 - density


def dlp_reference(mean_scores, target, alpha):
    """ironartisan/DLP lib/prune.py get_dlp_ratios: importance 1 - m / sum(m), mapped as OWL."""
    scores = np.asarray(mean_scores, dtype=np.float64)
    importance = 1 - scores / scores.sum()
    span = importance.max() - importance.min()
    scaled = (importance - importance.min()) * (1 / span * alpha * 2)
    return 1 - (scaled - scaled.mean() + (1 - target))


def alphapruning_reference(alphas, layer_params, target, epsilon):
    """haiquanlu/AlphaPruning lib/prune.py ww_sparsity, per layer (block-wise metrics repeated)."""
    scores, params = np.asarray(alphas, dtype=np.float64), np.asarray(layer_params, float)
    ratios = (scores - scores.min()) / (scores.max() - scores.min()) * (2 * epsilon) + 1 - epsilon
    return ratios * (params.sum() * target / (params * ratios).sum())


def atp_reference(n_blocks, target, beta):
    """wzhuang-xmu/ATP main.py: an arithmetic progression with mean ``target``."""
    first = target - (beta * (n_blocks - 1)) / 2
    return np.array([first + i * beta for i in range(n_blocks)])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(0.01, 50.0), min_size=2, max_size=40, unique=True),
    st.floats(0.3, 0.8),
    st.floats(0.01, 0.2),
)
def test_published_mappings_equal_their_reference_formulas(scores, target, strength):
    """Blocks of equal size and no bound hit: the exact-mean shift changes nothing."""
    scores, params = np.array(scores), np.ones(len(scores))
    np.testing.assert_allclose(
        allocate("owl", scores, params, target, **{"lambda": strength}),
        owl_reference(scores, target, strength),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        allocate("dlp", scores, params, target, alpha=strength),
        dlp_reference(scores, target, strength),
        atol=1e-12,
    )
    # AlphaPruning: 7 layers of two sizes per block; block-wise sparsity = each layer's.
    layer_params = np.tile([1.0, 1.0, 1.0, 1.0, 2.7, 2.7, 2.7], len(scores))
    per_layer = alphapruning_reference(np.repeat(scores, 7), layer_params, target, strength)
    assume(per_layer.max() < 0.99)  # the reference never clips; with no bound hit they agree
    block = allocate("alphapruning", scores, params * 15.1, target, epsilon=strength)
    np.testing.assert_allclose(block, per_layer[::7], atol=1e-12)
    beta = atp_grid(len(scores), target, 0.002)[-1]
    offsets = beta * (np.arange(len(scores)) - (len(scores) - 1) / 2)
    np.testing.assert_allclose(
        allocate("atp", offsets, params, target, (0.0, 1.0)),
        atp_reference(len(scores), target, beta),
        atol=1e-12,
    )


def test_golden_section_finds_the_minimum_of_every_unimodal_sequence():
    for n in range(1, 60):
        for best in range(n):
            calls: list[int] = []

            def loss(i: int, best: int = best, calls: list[int] = calls) -> float:
                calls.append(i)
                return abs(i - best) + 1e-3 * i

            assert unimodal_argmin(loss, n) == best
            assert len(calls) == len(set(calls)) <= 14, (n, best, calls)
    # a flat start (beta too small to matter) and a noisy floor still end at a minimum
    values = [5.0, 5.0, 5.0, 4.0, 3.0, 3.1, 3.05, 6.0]
    assert values[unimodal_argmin(values.__getitem__, len(values))] <= 3.1


def test_atp_grid_is_the_reference_grid():
    # LLaMA-7B at 70%: legal while beta <= min(1.4, 0.6) / 31 = 0.019354...
    assert atp_grid(32, 0.7, 0.002) == pytest.approx([0.002 * k for k in range(1, 10)])
    assert atp_grid(30, 0.5, 0.002)[-1] == pytest.approx(0.034)
    with pytest.raises(ValueError, match="lower the step"):
        atp_grid(32, 0.7, 0.05)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        atp_grid(1, 0.5, 0.002)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: uniform_allocation(None, [1, 1], 0.0), r"sparsity must be in \(0, 1\)"),
        (lambda: linear_allocation([1, 2], [1, 1], 1.0), r"sparsity must be in \(0, 1\)"),
        (lambda: allocate("owl", [1.0], [1], -0.2), "sparsity"),
        (lambda: linear_allocation([1, 2], [1, 1], 0.5, (0.6, 0.9)), "bounds"),
        (lambda: linear_allocation([1, 2], [1, 1], 0.5, (0.0, 0.4)), "bounds"),
        (lambda: linear_allocation([1, 2], [1, 1], 0.5, (0.7, 0.3)), "bounds"),
        (lambda: linear_allocation([1, 2], [1, 1], 0.5, lam=-0.1), "lam"),
        (lambda: linear_allocation([1, 2, 3], [1, 1], 0.5), "scores"),
        (lambda: linear_allocation([1, np.nan], [1, 1], 0.5), "scores"),
        (lambda: alphapruning_allocation([1, 2], [1, 1], 0.5, epsilon=1.0), "epsilon"),
        (lambda: uniform_allocation(None, [1, 0], 0.5), "params"),
        (lambda: uniform_allocation(None, [], 0.5), "params"),
        (lambda: allocate("random", None, [1], 0.5), "choose one of svnup, "),
        (lambda: allocate("svnup", None, [1], 0.5), "needs per-block scores"),
        (lambda: allocate("owl", [1.0], [1], 0.5, m=3.0), r"takes \['lambda'\], not \['m'\]"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_every_method_has_a_mapping_that_takes_its_parameters():
    for method, entry in ALLOCATIONS.items():
        scores, levels = None if entry.source is None else np.array([0.1, 0.3, 0.2]), None
        if entry.source is not None and entry.source.kind == "levels":
            levels = entry.params["levels"].default
            scores = np.outer(np.exp(np.array(levels) * 8), [0.1, 0.3, 0.2])
        params = {name: entry.params[name].default for name in entry.mapping_params}
        sparsity = allocate(method, scores, np.ones(3), 0.5, levels=levels, **params)
        assert weighted_mean(sparsity, np.ones(3)) == pytest.approx(0.5), method


def test_no_torch_import():
    code = "import sys, svnup.allocation, svnup.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_damage_recovers_an_exponential_model():
    levels = np.array([0.3, 0.45, 0.6, 0.75])
    scale = np.array([0.02, 0.005, 0.011, 0.3])
    damage = np.outer(np.exp(9.0 * levels), scale)
    curvature, fitted = fit_damage(damage, levels)
    assert curvature == pytest.approx(9.0, rel=0.01)
    np.testing.assert_allclose(fitted, scale, rtol=0.06)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=20),
    st.floats(2.0, 20.0),
    st.floats(0.2, 0.8),
    st.lists(st.floats(1.0, 5.0), min_size=20, max_size=20),
)
def test_damage_allocation_is_the_constrained_optimum(scales, curvature, target, sizes):
    """KKT: every block strictly inside the bounds has the same marginal damage per weight,
    a_b c exp(c s_b) / w_b; blocks at the upper bound have less, at the lower bound more."""
    scales = np.array(scales)
    params = np.array(sizes[: scales.size])
    levels = np.array([0.3, 0.5, 0.7])
    damage = np.outer(np.exp(curvature * levels), scales)
    bounds = (0.05, 0.95)
    sparsity = damage_allocation(damage, params, target, bounds, levels=levels, floor=1e-6)
    assert weighted_mean(sparsity, params) == pytest.approx(target, abs=1e-9)
    c, a = fit_damage(damage, levels)
    price = a * c * np.exp(c * sparsity) / (params / params.sum())
    inside = (sparsity > bounds[0] + 1e-9) & (sparsity < bounds[1] - 1e-9)
    if inside.any():
        mu = np.median(price[inside])
        np.testing.assert_allclose(price[inside], mu, rtol=1e-6)
        assert (price[sparsity >= bounds[1] - 1e-9] <= mu * (1 + 1e-6)).all()
        assert (price[sparsity <= bounds[0] + 1e-9] >= mu * (1 - 1e-6)).all()


def test_damage_allocation_floors_blocks_lost_in_noise():
    levels = np.array([0.3, 0.5, 0.7])
    damage = np.outer(np.exp(8 * levels), [1.0, 1.0, 1.0, -0.01])  # last block: noise
    damage[:, 3] = [-0.02, 0.01, -0.01]
    sparsity = damage_allocation(damage, np.ones(4), 0.5, levels=levels, floor=0.25)
    # floored to 0.25 x the median scale: ln(4) / c above the others, not the upper bound
    c, _ = fit_damage(damage, levels)
    assert sparsity[3] - sparsity[0] == pytest.approx(np.log(4) / c, rel=1e-6)
    assert sparsity[3] < 0.99
    with pytest.raises(ValueError, match="no block's fitted damage is positive"):
        damage_allocation(-np.abs(damage), np.ones(4), 0.5, levels=levels)
    with pytest.raises(ValueError, match="levels must increase"):
        damage_allocation(damage, np.ones(4), 0.5, levels=levels[::-1])
