"""The type game's coalitions and the within-half profile its damage fit gives."""

import importlib.util
import math
from pathlib import Path

import pytest

from svnup.players import make_players

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


def test_a_type_coalition_prunes_that_layer_in_every_block(types):
    players = make_players("layers", [SHAPES] * 3, "self_attn")
    masks = types.type_masks(players)
    assert list(masks) == list(SHAPES)
    assert sum(masks.values()) == (1 << len(players)) - 1  # disjoint, and they cover everyone
    for name, mask in masks.items():
        pruned = [p for bit, p in enumerate(players) if mask >> bit & 1]
        assert [p.block for p in pruned] == [0, 1, 2]
        assert {p.layers for p in pruned} == {(name,)}


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


def test_the_per_type_split_keeps_the_half_mean_and_meets_the_marginals(types):
    curves = {"self_attn.q_proj": (5.0, 1e-3), "self_attn.k_proj": (7.0, 5e-4)}
    curves |= {"self_attn.v_proj": (6.0, 3e-3), "self_attn.o_proj": (9.0, 1e-4)}
    params = {t: PARAMS[t] for t in curves}
    split = types.equal_marginal_split(0.5, params, curves)
    mean = sum(split[t] * params[t] for t in split) / sum(params.values())
    assert mean == pytest.approx(0.5, abs=1e-9)
    marginal = [r * c * math.exp(c * split[t]) / params[t] for t, (c, r) in curves.items()]
    assert marginal == pytest.approx([marginal[0]] * len(marginal), rel=1e-6)
    clipped = types.equal_marginal_split(0.5, params, curves, low=0.3, high=0.6)
    assert min(clipped.values()) >= 0.3 and max(clipped.values()) <= 0.6
    mean = sum(clipped[t] * params[t] for t in clipped) / sum(params.values())
    assert mean == pytest.approx(0.5, abs=1e-9)
