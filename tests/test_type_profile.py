"""The type game's coalitions and the within-half profile its damage fit gives."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "type_profile.py"
SHAPES = {
    "self_attn.q_proj": (8, 8),
    "self_attn.k_proj": (2, 8),
    "self_attn.v_proj": (2, 8),
    "self_attn.o_proj": (8, 8),
    "mlp.gate_proj": (16, 8),
    "mlp.up_proj": (16, 8),
    "mlp.down_proj": (8, 16),
}
PARAMS = {n: a * b for n, (a, b) in SHAPES.items()}


@pytest.fixture(scope="module")
def types():
    spec = importlib.util.spec_from_file_location("type_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_offsets_equalise_the_marginal_damage_inside_each_half(types):
    scales = {"self_attn.q_proj": 1.0, "self_attn.k_proj": 0.5, "self_attn.v_proj": 2.0}
    scales |= {"self_attn.o_proj": 1.0, "mlp.gate_proj": 1.0, "mlp.up_proj": 1.0}
    scales |= {"mlp.down_proj": 3.0}
    c = 8.0
    offsets = types.profile_offsets(scales, c, PARAMS, "self_attn")
    for half in ("self_attn.", "mlp."):
        group = [t for t in SHAPES if t.startswith(half)]
        assert sum(offsets[t] * PARAMS[t] for t in group) == pytest.approx(0.0, abs=1e-12)
        # at s = K + offset, r_t c exp(c s_t) / w_t is the same for every type of the half
        marginal = [scales[t] * c * math.exp(c * offsets[t]) / PARAMS[t] for t in group]
        assert marginal == pytest.approx([marginal[0]] * len(group))
    assert offsets["self_attn.v_proj"] < offsets["self_attn.k_proj"]  # same size, 4x the damage
    assert offsets["mlp.down_proj"] < offsets["mlp.gate_proj"]


def test_the_per_type_plan_keeps_every_half_mean_of_the_budget_it_splits(types):
    names = list(SHAPES)
    levels = [0.6, 0.7, 0.8]
    rates = [5.0, 7.0, 6.0, 9.0, 8.0, 10.0, 6.5]
    damage = [[1e-3 * (t + 1) * math.exp(c * s) for t, c in enumerate(rates)] for s in levels]
    game = {"damage": damage, "levels": levels, "types": names, "params": PARAMS}
    game |= {"attention": "self_attn", "n_blocks": 2}
    across = {"layer_sparsities": [dict.fromkeys(names, 0.4), dict.fromkeys(names, 0.6)]}
    plan = types.per_type_plan(game, across)
    assert game["fit"]["curves"]["mlp.up_proj"][0] == pytest.approx(10.0, rel=0.01)  # the grid
    for block, mean in enumerate((0.4, 0.6)):
        for half in ("self_attn.", "mlp."):
            group = [t for t in names if t.startswith(half)]
            held = sum(PARAMS[t] for t in group)
            assert sum(plan[block][t] * PARAMS[t] for t in group) / held == pytest.approx(mean)
        assert len(set(plan[block].values())) > 2  # the types differ inside each half
