"""LSA: the zeroing error against a plain per-row greedy search, on random layers, on a tiny random
model and on the real c4-llama-12L with real C4 activations; its map to sparsities against the
reference's formulas; its beta by target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import C4, C4_LLAMA, build_tiny_llama, needs_shared, random_ids

from svnup import stages
from svnup.allocation import allocate, lsa_beta
from svnup.io import read_json, read_scores
from svnup.metrics import lsa_error, lsa_zeroing_error
from svnup.models import linear_layers, load_model
from svnup.registry import ALLOCATIONS


def greedy_reference(weight, hessian, fraction: float, group: int) -> float:
    """Row by row, in float64: each group of columns zeroes int(fraction * width) columns, one at
    a time, always the one whose addition to the zeroed set S raises w_S^T H w_S the least (the
    rise recomputed from H (w masked to S) each step); returns the sum over rows of w_S^T H w_S."""
    w = weight.detach().double().numpy()
    h = hessian.double().numpy()
    total = 0.0
    for row in w:
        zeroed = np.zeros(row.size, dtype=bool)
        for start in range(0, row.size, group):
            end = min(start + group, row.size)
            for _ in range(int(fraction * (end - start))):
                v = np.where(zeroed, row, 0.0)
                rise = row**2 * np.diag(h) + 2 * row * (h @ v)
                candidates = [j for j in range(start, end) if not zeroed[j]]
                zeroed[min(candidates, key=lambda j: rise[j])] = True
        v = np.where(zeroed, row, 0.0)
        total += float(v @ h @ v)
    return total


def random_layer(rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
    x[:, : cols // 8] *= 10  # a few outlier features, as in real activations
    return torch.randn(rows, cols, generator=gen), 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize(
    ("rows", "cols", "fraction", "group"),
    [(12, 64, 0.5, 16), (9, 40, 0.5, 16), (7, 24, 0.3, 128), (16, 48, 0.75, 48)],
)
def test_zeroing_error_is_the_greedy_row_search(rows, cols, fraction, group):
    weight, hessian = random_layer(rows, cols, rows + cols)
    expected = greedy_reference(weight, hessian, fraction, group)
    got = lsa_zeroing_error(weight, hessian, fraction, group)
    assert got == pytest.approx(expected, rel=1e-4)


def test_later_groups_see_the_columns_zeroed_before_them():
    weight, hessian = random_layer(6, 32, 3)
    whole = lsa_zeroing_error(weight, hessian, 0.5, 16)
    apart = lsa_zeroing_error(weight[:, :16], hessian[:16, :16], 0.5, 16) + lsa_zeroing_error(
        weight[:, 16:], hessian[16:, 16:], 0.5, 16
    )
    assert whole == pytest.approx(greedy_reference(weight, hessian, 0.5, 16), rel=1e-4)
    assert whole != pytest.approx(apart, rel=1e-3)  # the cross terms H[g1, g2] count


def test_error_scales_with_the_hessian_and_the_errors_are_what_the_blocks_average():
    weight, hessian = random_layer(8, 32, 5)
    base = lsa_zeroing_error(weight, hessian)
    assert lsa_zeroing_error(weight, hessian * 2048) == pytest.approx(base * 2048, rel=1e-5)
    other = random_layer(16, 32, 6)
    layers = {"a": (weight, hessian), "b": other}
    per_layer = lsa_error(layers, granularity="projection")
    assert per_layer == {"a": base, "b": lsa_zeroing_error(*other)}
    assert lsa_error(layers) == pytest.approx((per_layer["a"] + per_layer["b"]) / 2)
    with pytest.raises(ValueError, match="granularity must be block or projection"):
        lsa_error(layers, granularity="halves")
    with pytest.raises(ValueError, match="fraction must be in"):
        lsa_zeroing_error(weight, hessian, fraction=1.0)


@torch.no_grad()
def _plain_hessians(model, ids) -> dict[tuple[int, str], torch.Tensor]:
    """2/n X^T X of every linear layer's inputs in one plain HF forward of the dense model."""
    sums, hooks = {}, []
    for index, block in enumerate(model.model.layers):
        for name, layer in linear_layers(block).items():

            def hook(module, args, out, key=(index, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = 2 * x.T @ x / x.shape[0]

            hooks.append(layer.register_forward_hook(hook))
    model(input_ids=ids, use_cache=False)
    for handle in hooks:
        handle.remove()
    return sums


def _calibration(path, ids, block_params):
    """A calibration record of ``ids`` (the Hessian metric reads only the tokens, the budget only
    the blocks' weights)."""
    from svnup.calibration import save_statistics

    meta = {"spec": {}, "block_params": block_params}
    save_statistics(path, ids, [{}] * len(block_params), meta)
    return path


@pytest.mark.parametrize("granularity", ["block", "projection"])
def test_metric_stage_scores_a_tiny_model_from_its_dense_hessians(tmp_path, granularity):
    """The scores are the plain greedy errors of each block or linear layer, and the budget maps
    them with the reference's beta of that granularity (0.1 by block at 60%, 0.08 by projection)."""
    path = build_tiny_llama(tmp_path / "tiny", layers=3)
    ids = random_ids(96, n=4, seqlen=20)
    engine, _ = load_model(path, with_tokenizer=False)
    numels = [
        {name: layer.weight.numel() for name, layer in linear_layers(block).items()}
        for block in engine.blocks
    ]
    calibration = _calibration(tmp_path / "calibration.h5", ids, [sum(n.values()) for n in numels])
    spec = {"metric": "lsa", "granularity": granularity, "fraction": 0.5, "group": 16}
    model = {"path": str(path), "dtype": "float32"}
    stages.metric(spec, {"batch_size": 3}, model, calibration, tmp_path / "scores.json")
    values, _, meta = read_scores(tmp_path / "scores.json")

    hessians = _plain_hessians(engine.model, ids)
    errors = {
        key: greedy_reference(linear_layers(engine.blocks[key[0]])[key[1]].weight, h, 0.5, 16)
        for key, h in hessians.items()
    }
    if granularity == "block":
        expected = [np.mean([e for (b, _), e in errors.items() if b == i]) for i in range(3)]
        assert "players" not in meta
    else:
        names = [f"{b}.{n}" for b, n in errors]
        assert [p["name"] for p in meta["players"]] == names
        assert [p["params"] for p in meta["players"][:2]] == [32 * 32, 16 * 32]
        expected = list(errors.values())
    np.testing.assert_allclose(values, expected, rtol=1e-4)

    budget = {"method": "lsa", "min": 0.0, "max": 0.99, "beta": None, "granularity": granularity}
    assert set(budget) - {"method", "min", "max"} == set(ALLOCATIONS["lsa"].mapping_params)
    stages.budget(budget, 0.6, calibration, tmp_path / "scores.json", tmp_path / "budget.json")
    plan = read_json(tmp_path / "budget.json")
    if granularity == "block":
        np.testing.assert_allclose(plan["sparsities"], reference_block_map(values, 0.6, 0.1))
    else:
        numel = [n for block in numels for n in block.values()]
        wanted = reference_projection_map(values, numel, 0.6, 0.08)
        np.testing.assert_allclose(plan["player_sparsities"], wanted)


@needs_shared(C4_LLAMA)
def test_real_model_errors_match_the_plain_greedy_search():
    """c4-llama-12L blocks 0 and 11, every linear layer, with the dense Hessians of real C4 text
    (128 columns a group: q, k, v, o and gate, up in one group each, down in three)."""
    from svnup.calibration import block_statistics
    from svnup.data import calibration_samples

    engine, tokenizer = load_model(C4_LLAMA)
    ids = calibration_samples(tokenizer, str(C4), nsamples=4, seqlen=128, seed=0)
    hidden, kwargs = engine.embed(ids)
    for index in range(engine.n_blocks):
        stats, hidden = block_statistics(engine, index, hidden, kwargs, hessian=True)
        if index not in (0, 11):
            continue
        for name, layer in linear_layers(engine.blocks[index]).items():
            hessian = stats[name].pop_hessian()
            weight = layer.weight.data[:48]  # rows are searched apart; 48 of each keep it quick
            expected = greedy_reference(weight, hessian, 0.5, 128)
            assert lsa_zeroing_error(weight, hessian) == pytest.approx(expected, rel=1e-4), name


def reference_block_map(errors, target, beta):
    """The reference's block map: importance 1 - e / sum(e), min-max scaled to [0, 2 beta];
    sparsity = target + mean(importance) - importance."""
    errors = np.asarray(errors, dtype=np.float64)
    importance = 1 - errors / errors.sum()
    importance = (importance - importance.min()) / (importance.max() - importance.min())
    importance *= 2 * beta
    return target + importance.mean() - importance


def reference_projection_map(errors, numel, target, beta):
    """The reference's projection map: the same importance over every linear layer, as pruned
    weights: numel * target + (mean(importance) - importance) * mean(numel)."""
    errors, numel = np.asarray(errors, float), np.asarray(numel, float)
    importance = 1 - errors / errors.sum()
    importance = (importance - importance.min()) / (importance.max() - importance.min())
    importance *= 2 * beta
    return (numel * target + (importance.mean() - importance) * numel.mean()) / numel


def test_maps_equal_the_reference_formulas():
    gen = np.random.default_rng(0)
    errors = gen.gamma(2.0, 3.0, size=12) * np.linspace(1, 20, 12)
    for target in (0.5, 0.6, 0.7):
        beta = lsa_beta(target)
        got = allocate("lsa", errors, np.full(12, 7e6), target, beta=None)
        np.testing.assert_allclose(got, reference_block_map(errors, target, beta), atol=1e-12)
    numel = np.tile([16.8e6, 16.8e6, 16.8e6, 16.8e6, 45.1e6, 45.1e6, 45.1e6], 4)
    layer_errors = gen.gamma(2.0, 3.0, size=28) * numel / 1e6
    got = allocate("lsa", layer_errors, numel, 0.7, beta=0.07, granularity="projection")
    expected = reference_projection_map(layer_errors, numel, 0.7, 0.07)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    default = allocate("lsa", layer_errors, numel, 0.7, beta=None, granularity="projection")
    expected_default = reference_projection_map(layer_errors, numel, 0.7, 0.08)
    np.testing.assert_allclose(default, expected_default, atol=1e-12)
    assert np.dot(got, numel) / numel.sum() == pytest.approx(0.7, abs=1e-12)
    assert np.argmax(got) == np.argmax(expected)  # the largest error prunes most (per weight)


def test_beta_follows_the_reference_table():
    assert [lsa_beta(t) for t in (0.5, 0.6, 0.7, 0.8)] == [0.04, 0.1, 0.15, 0.12]
    assert lsa_beta(0.65) == 0.1 and lsa_beta(0.3) == 0.04 and lsa_beta(0.05) == 0.08
    with pytest.raises(ValueError, match="set allocation.lsa.beta"):
        lsa_beta(0.9)
    # by projection (the reference's lsac) the table is not read: its --Lamda default
    assert {lsa_beta(t, "projection") for t in (0.05, 0.5, 0.6, 0.7, 0.9)} == {0.08}


def test_metric_stage_refuses_a_missing_calibration(tmp_path):
    with pytest.raises(ValueError, match="needs --calibration"):
        stages.metric({"metric": "lsa"}, {}, {"path": "x", "dtype": "float32"}, None, tmp_path)
