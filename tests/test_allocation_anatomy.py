"""The anatomy diagnostic's recombined allocations keep every half's mean and the total exact."""

import importlib.util
import random
from pathlib import Path

import pytest

from svnup.players import make_players

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "allocation_anatomy.py"
SHAPES = {  # a LLaMA block's linear layers, k and v narrower than q and o
    "self_attn.q_proj": (8, 8),
    "self_attn.k_proj": (2, 8),
    "self_attn.v_proj": (2, 8),
    "self_attn.o_proj": (8, 8),
    "mlp.gate_proj": (16, 8),
    "mlp.up_proj": (16, 8),
    "mlp.down_proj": (8, 16),
}


@pytest.fixture(scope="module")
def anatomy():
    spec = importlib.util.spec_from_file_location("allocation_anatomy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model():
    shapes = [SHAPES] * 3
    params = [{n: a * b for n, (a, b) in block.items()} for block in shapes]
    return make_players("halves", shapes, "self_attn"), params


def _random_plan(params, seed):
    rng = random.Random(seed)
    return [{n: rng.uniform(0.1, 0.9) for n in block} for block in params]


def _half_means(plan, halves, params):  # written out, not the script's half_mean
    means = []
    for half in halves:
        zeros = sum(plan[half.block][n] * params[half.block][n] for n in half.layers)
        means.append(zeros / sum(params[half.block][n] for n in half.layers))
    return means


def test_flattened_sets_each_layer_to_its_half_mean(anatomy, model):
    halves, params = model
    plan = _random_plan(params, 0)
    flat = anatomy.flattened(plan, halves, params)
    means = _half_means(plan, halves, params)
    for half, mean in zip(halves, means, strict=True):
        assert all(flat[half.block][n] == pytest.approx(mean) for n in half.layers)
    assert anatomy.total(flat, params) == pytest.approx(anatomy.total(plan, params))


def test_the_profile_is_the_mean_offset_of_each_type(anatomy, model):
    halves, params = model
    plan = _random_plan(params, 1)
    profile = anatomy.within_profile(plan, halves, params)
    means = _half_means(plan, halves, params)
    for name in SHAPES:
        offsets = [
            plan[h.block][name] - m for h, m in zip(halves, means, strict=True) if name in h.layers
        ]
        assert profile[name] == pytest.approx(sum(offsets) / len(offsets))


@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4x pushes layers past [0, 0.99]: clipped
def test_a_moved_profile_keeps_every_half_mean(anatomy, model, scale):
    halves, params = model
    across, within = _random_plan(params, 2), _random_plan(params, 3)
    profile = {n: scale * v for n, v in anatomy.within_profile(within, halves, params).items()}
    moved = anatomy.with_profile(across, halves, params, profile)
    assert _half_means(moved, halves, params) == pytest.approx(
        _half_means(across, halves, params), abs=1e-9
    )
    values = [v for block in moved for v in block.values()]
    assert min(values) >= 0.0 and max(values) <= 0.99
    if scale == 1.0:  # unclipped: exactly the half mean plus the offset
        for half, mean in zip(halves, _half_means(across, halves, params), strict=True):
            for n in half.layers:
                assert moved[half.block][n] == pytest.approx(mean + profile[n])
    else:
        assert min(values) == 0.0 or max(values) == 0.99


def test_recombined_drops_copies_and_keeps_the_total(anatomy, model):
    halves, params = model
    blocks = {"sparsities": [0.3, 0.5, 0.7], "target": None}
    plans = {
        "per-linear": _random_plan(params, 4),
        "blocks": anatomy.per_linear(blocks, params),
    }
    kept = anatomy.recombined(plans, halves, params)
    # blocks-halves is blocks itself, and blocks' profile is zero: per-linear+blocks-profile is
    # per-linear-halves
    assert list(kept) == ["per-linear", "blocks", "per-linear-halves", "blocks+per-linear-profile"]
    assert anatomy.total(kept["per-linear-halves"], params) == pytest.approx(
        anatomy.total(plans["per-linear"], params)
    )
    assert anatomy.total(kept["blocks+per-linear-profile"], params) == pytest.approx(
        anatomy.total(plans["blocks"], params)
    )


def test_uniform_type_splits_hold_the_target_in_every_half_or_block(anatomy, model):
    halves, params = model
    rates = dict(zip(SHAPES, (5.0, 7.0, 6.0, 9.0, 8.0, 10.0, 6.5), strict=True))
    curves = {
        n: {"curvature": c, "scale": 1e-3 * (i + 1)} for i, (n, c) in enumerate(rates.items())
    }
    budgets = {"fit": {"target": 0.6, "type_curves": curves}, "plain": {"target": 0.6}}
    plans = anatomy.uniform_type_splits(budgets, halves, params)
    assert set(plans) == {"uniform+fit-types", "uniform+fit-block-types"}
    assert _half_means(plans["uniform+fit-types"], halves, params) == pytest.approx([0.6] * 6)
    whole = plans["uniform+fit-block-types"]
    for layers, sizes in zip(whole, params, strict=True):
        assert anatomy.total([layers], [sizes]) == pytest.approx(0.6)
    assert _half_means(whole, halves, params) != pytest.approx([0.6] * 6)  # halves trade too
