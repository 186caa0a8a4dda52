"""Shapley estimators on games whose values are known by hand."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from svnup.shapley import (
    Exact,
    LeaveOneOut,
    Permutation,
    SlidingWindow,
    exact_shapley,
    make_estimator,
    sliding_windows,
)


def dense_blocks(mask: int, n: int) -> list[int]:
    return [i for i in range(n) if not mask >> i & 1]


def additive_game(a: np.ndarray, base: float = 0.3):
    return lambda mask: base + sum(a[i] for i in dense_blocks(mask, len(a)))


def pairwise_game(a: np.ndarray, pairs: dict[tuple[int, int], float]):
    """Additive part plus b_jk whenever both j and k are dense."""

    def value(mask: int) -> float:
        dense = set(dense_blocks(mask, len(a)))
        return sum(a[i] for i in dense) + sum(b for (j, k), b in pairs.items() if {j, k} <= dense)

    return value


def random_game(n: int, seed: int):
    """A nonlinear game: a random table plus a saturating function of the dense set."""
    rng = np.random.default_rng(seed)
    table = rng.normal(scale=0.3, size=1 << n)
    w = rng.uniform(0.5, 2.0, size=n)
    return lambda mask: float(np.tanh(w[dense_blocks(mask, n)].sum() / 3) + table[mask])


A6 = np.array([0.5, -0.2, 1.5, 0.0, 0.7, 2.0])


@pytest.mark.parametrize(
    "estimator",
    [
        Exact(6),
        SlidingWindow(6, width=1),
        SlidingWindow(6, width=2, stride=2),
        SlidingWindow(6, width=4, stride=3),
        SlidingWindow(6, width=6),
        LeaveOneOut(6),
        Permutation(6, n_permutations=8),
        Permutation(6, n_permutations=3, antithetic=False),
    ],
    ids=lambda e: f"{e.name}",
)
def test_additive_game_returns_contributions(estimator):
    result = estimator.estimate(additive_game(A6))
    np.testing.assert_allclose(result.values, A6, atol=1e-12)
    assert result.n_coalitions == len(estimator.coalitions())


def test_symmetric_game_gives_equal_values():
    n = 7
    f = np.array([0.0, 0.1, 0.5, 0.6, 1.4, 1.5, 2.9, 3.0])
    value = lambda mask: f[n - mask.bit_count()]  # noqa: E731
    np.testing.assert_allclose(Exact(n).estimate(value).values, np.full(n, f[n] / n), atol=1e-12)
    for width in (2, 3):
        swsv = SlidingWindow(n, width=width).estimate(value).values
        np.testing.assert_allclose(swsv, np.full(n, (f[n] - f[n - width]) / width), atol=1e-12)
    np.testing.assert_allclose(LeaveOneOut(n).estimate(value).values, np.full(n, f[n] - f[n - 1]))


def test_pairwise_interaction_split_by_hand():
    # Pair (2, 3) sits in every window of width 4 that holds either block, so SWSV splits it
    # like Shapley. Blocks 0 and 5 never share a window: each sees the other always dense and
    # takes the whole interaction, so SWSV double counts it and loses efficiency.
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    game = pairwise_game(a, {(2, 3): 1.0, (0, 5): -0.6})
    exact = Exact(6).estimate(game).values
    np.testing.assert_allclose(exact, a + [-0.3, 0, 0.5, 0.5, 0, -0.3], atol=1e-12)
    swsv = SlidingWindow(6, width=4).estimate(game).values
    np.testing.assert_allclose(swsv, a + [-0.6, 0, 0.5, 0.5, 0, -0.6], atol=1e-12)
    assert swsv.sum() == pytest.approx(exact.sum() - 0.6)


def test_pairwise_interactions_swsv_matches_window_rule():
    """Within a window a pair is split if both members are inside, else its member takes it all."""
    n, rng = 9, np.random.default_rng(3)
    a = rng.normal(size=n)
    pairs = {(0, 1): 0.8, (1, 4): -0.5, (3, 8): 1.2, (6, 7): 0.4}
    game = pairwise_game(a, pairs)
    exact_expected = a.copy()
    for (j, k), b in pairs.items():
        exact_expected[[j, k]] += b / 2
    np.testing.assert_allclose(Exact(n).estimate(game).values, exact_expected, atol=1e-12)

    est = SlidingWindow(n, width=3, stride=2)
    share: dict[int, list[float]] = {i: [] for i in range(n)}
    for start, end in est.windows:
        inside = set(range(start, end))
        for i in inside:
            extra = sum(
                (b / 2 if (k if i == j else j) in inside else b)
                for (j, k), b in pairs.items()
                if i in (j, k)
            )
            share[i].append(a[i] + extra)
    expected = np.array([np.mean(share[i]) for i in range(n)])
    np.testing.assert_allclose(est.estimate(game).values, expected, atol=1e-12)


def test_exact_is_efficient():
    n = 7
    game = random_game(n, seed=1)
    values = Exact(n).estimate(game).values
    assert values.sum() == pytest.approx(game(0) - game((1 << n) - 1), abs=1e-12)


def test_exact_shapley_matches_definition():
    """Vectorised table evaluation against the permutation definition (all 5! orders)."""
    n = 5
    table = np.random.default_rng(7).normal(size=1 << n)
    full = (1 << n) - 1
    brute = np.zeros(n)
    for order in itertools.permutations(range(n)):
        dense = 0
        for i in order:
            brute[i] += table[full ^ (dense | 1 << i)] - table[full ^ dense]
            dense |= 1 << i
    np.testing.assert_allclose(exact_shapley(table), brute / 120, atol=1e-12)


def test_swsv_full_width_equals_exact():
    n = 7
    game = random_game(n, seed=2)
    swsv = SlidingWindow(n, width=n).estimate(game)
    np.testing.assert_allclose(swsv.values, Exact(n).estimate(game).values, atol=1e-12)
    assert np.isnan(swsv.stderr).all()


def test_swsv_stderr_spread_across_windows():
    n = 8
    result = SlidingWindow(n, width=4, stride=2).estimate(random_game(n, seed=4))
    assert np.isnan(result.stderr[[0, 1, 6, 7]]).all()
    assert (result.stderr[2:6] > 0).all()


def test_permutation_converges_to_exact():
    n = 8
    game = random_game(n, seed=5)
    exact = Exact(n).estimate(game).values
    result = Permutation(n, n_permutations=600, seed=11).estimate(game)
    assert (result.stderr > 0).all()
    z = np.abs(result.values - exact) / result.stderr
    assert z.max() < 3.5, z
    assert np.abs(result.values - exact).max() < 0.1


def test_permutation_is_seeded_and_antithetic():
    p = Permutation(10, n_permutations=6, seed=3)
    np.testing.assert_array_equal(p.permutations[1], p.permutations[0][::-1])
    assert p.coalitions() == Permutation(10, n_permutations=6, seed=3).coalitions()
    assert p.coalitions() != Permutation(10, n_permutations=6, seed=4).coalitions()
    assert {0, (1 << 10) - 1} <= set(p.coalitions())
    with pytest.raises(ValueError, match="permutation.n_permutations"):
        Permutation(10, n_permutations=5)


def test_masks_beyond_64_blocks():
    n = 70
    a = np.linspace(-1, 1, n)
    a[69] = 5.0
    game = additive_game(a)
    swsv = SlidingWindow(n, width=3)
    assert max(swsv.coalitions()) == 0b111 << 67
    loo, perm = LeaveOneOut(n), Permutation(n, n_permutations=4)
    assert 1 << 69 in loo.coalitions()
    assert (1 << 70) - 1 in perm.coalitions()
    for est in (swsv, loo, perm):
        np.testing.assert_allclose(est.estimate(game).values, a, atol=1e-9)
    with pytest.raises(ValueError, match="n_blocks <= 20"):
        Exact(n)


@pytest.mark.parametrize(
    ("n", "width", "stride", "expected"),
    [
        (10, 4, 3, [(0, 4), (3, 7), (6, 10)]),
        (10, 4, 4, [(0, 4), (4, 8), (6, 10)]),
        (5, 5, 1, [(0, 5)]),
        (5, 2, 2, [(0, 2), (2, 4), (3, 5)]),
    ],
)
def test_sliding_windows_examples(n, width, stride, expected):
    assert sliding_windows(n, width, stride) == expected


def test_sliding_windows_cover_every_block_once_aligned():
    for n in range(1, 15):
        for width in range(1, n + 1):
            for stride in range(1, width + 1):
                windows = sliding_windows(n, width, stride)
                assert len(set(windows)) == len(windows)
                assert all(end - start == width for start, end in windows)
                assert windows[0][0] == 0 and windows[-1][1] == n
                covered = {i for start, end in windows for i in range(start, end)}
                assert covered == set(range(n))


@pytest.mark.parametrize(
    ("width", "stride", "key"),
    [(0, 1, "swsv.width"), (9, 1, "swsv.width"), (3, 0, "swsv.stride"), (3, 4, "swsv.stride")],
)
def test_sliding_windows_errors(width, stride, key):
    with pytest.raises(ValueError, match=key):
        sliding_windows(8, width, stride)


def test_swsv_coalition_count_matches_brute_force():
    est = SlidingWindow(12, width=4, stride=1)
    brute = {
        sum(1 << (start + i) for i in range(4) if sub >> i & 1)
        for start in range(9)
        for sub in range(16)
    }
    # Nonempty subsets spanning d <= 4 consecutive blocks, plus the empty mask.
    assert len(brute) == 1 + 12 + 11 + 10 * 2 + 9 * 4 == 80
    assert est.coalitions() == sorted(brute)
    assert est.estimate(additive_game(np.ones(12))).n_coalitions == 80


@pytest.mark.parametrize(
    "estimator",
    [Exact(4), SlidingWindow(7, width=3, stride=2), Permutation(7, 10), LeaveOneOut(7)],
    ids=lambda e: e.name,
)
def test_estimate_evaluates_each_listed_coalition_once(estimator):
    calls: Counter[int] = Counter()

    def value(mask: int) -> float:
        calls[mask] += 1
        return float(mask.bit_count())

    estimator.estimate(value)
    assert sorted(calls) == estimator.coalitions()
    assert set(calls.values()) == {1}


def test_coalition_counts():
    assert len(Exact(5).coalitions()) == 32
    assert LeaveOneOut(5).coalitions() == [0, 1, 2, 4, 8, 16]


def test_make_estimator():
    assert isinstance(make_estimator("exact", 4), Exact)
    swsv = make_estimator("swsv", 8, width=2, stride=2)
    assert swsv.windows == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert make_estimator("permutation", 5, n_permutations=4, seed=1).permutations.shape == (4, 5)
    assert isinstance(make_estimator("loo", 3), LeaveOneOut)
    with pytest.raises(ValueError, match="exact.*loo.*permutation.*swsv"):
        make_estimator("banzhaf", 4)
    with pytest.raises(ValueError, match="unknown parameters.*'window'"):
        make_estimator("swsv", 8, window=2)
    with pytest.raises(ValueError, match="n_blocks"):
        make_estimator("loo", 0)


def test_no_torch_import():
    code = "import sys, svnup.shapley; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
