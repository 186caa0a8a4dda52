"""``allocation.svnup-fit.split: types`` and ``svnup-types``: the type game (each linear-layer
type pruned in every block at once), its per-type damage curves and the split of each player
between its layers, each checked against a straightforward computation written out here."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_LAYERS, build_tiny_llama, random_ids

from svnup import config as cfg
from svnup import stages
from svnup.allocation import fit_damage, split_at_equal_marginal, type_curves
from svnup.calibration import dense_statistics, probe_masks, save_probe, save_statistics
from svnup.io import read_json, write_scores
from svnup.models import linear_layers, load_model
from svnup.players import make_players, type_layer_sparsities, type_masks

N_BLOCKS = 3
TYPES = LLAMA_LAYERS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-types")
    path = build_tiny_llama(folder / "model", layers=N_BLOCKS)
    engine, _ = load_model(path, with_tokenizer=False, batch_size=4)
    ids = random_ids(96, n=4, seqlen=24)
    stats = dense_statistics(engine, ids)
    probes = probe_masks(engine, stats, 0.6)
    masks = folder / "masks.h5"
    save_probe(masks, probes, {"spec": {"pruner": "wanda", "sparsity": 0.6}})
    calibration = folder / "calibration.h5"
    meta = {"n_blocks": N_BLOCKS, "block_params": engine.block_params(), "spec": {}}
    save_statistics(calibration, ids, stats, meta)
    return path, engine, ids, dict(enumerate(probes)), calibration, masks


def _shapes(engine):
    return [{n: tuple(m.weight.shape) for n, m in linear_layers(b).items()} for b in engine.blocks]


def test_a_type_mask_holds_that_layer_in_every_block_and_nothing_else(tiny):
    _, engine, *_ = tiny
    players = make_players("layers", _shapes(engine), "self_attn")
    masks = type_masks(players)
    assert tuple(masks) == TYPES
    for t, name in enumerate(TYPES):
        expected = sum(1 << (len(TYPES) * b + t) for b in range(N_BLOCKS))
        assert masks[name] == expected
    with pytest.raises(ValueError, match="need players 'layers'"):
        type_masks(make_players("halves", _shapes(engine), "self_attn"))
    uneven = _shapes(engine)
    del uneven[1]["mlp.up_proj"]
    with pytest.raises(ValueError, match="blocks hold different linear layers"):
        type_masks(make_players("layers", uneven, "self_attn"))


def _brute_split(mean, params, curvatures, scales, lo, hi, steps=4001):
    """The two-layer split by search: the second layer's sparsity follows from the mean."""
    w = params / params.sum()
    first = np.linspace(lo, hi, steps)
    second = (mean - w[0] * first) / w[1]
    feasible = (second >= lo) & (second <= hi)
    cost = scales[0] * np.exp(curvatures[0] * first) + scales[1] * np.exp(curvatures[1] * second)
    best = np.argmin(np.where(feasible, cost, np.inf))
    return np.array([first[best], second[best]])


@pytest.mark.parametrize(
    ("curvatures", "scales", "bounds"),
    [
        ([8.0, 8.0], [1.0, 3.0], (0.0, 0.99)),  # one curvature: the offsets of svnup-fit
        ([5.0, 12.0], [2.0, 0.5], (0.0, 0.99)),
        ([5.0, 12.0], [40.0, 0.01], (0.3, 0.8)),  # the optimum leaves the bounds: clipped
    ],
)
def test_split_minimises_the_predicted_damage_at_the_exact_mean(curvatures, scales, bounds):
    params, curvatures, scales = (
        np.array([300.0, 700.0]),
        np.array(curvatures),
        np.array(scales),
    )
    split = split_at_equal_marginal(0.6, params, curvatures, scales, bounds)
    assert np.dot(split, params) / params.sum() == pytest.approx(0.6, abs=1e-12)
    assert split.min() >= bounds[0] - 1e-12 and split.max() <= bounds[1] + 1e-12
    brute = _brute_split(0.6, params, curvatures, scales, *bounds)
    np.testing.assert_allclose(split, brute, atol=2e-3)


def test_an_unclipped_split_equalises_the_marginal_damage_per_weight():
    params = np.array([100.0, 100.0, 25.0, 400.0])
    curvatures, scales = np.array([6.0, 9.0, 14.0, 7.5]), np.array([0.8, 0.2, 0.05, 1.1])
    split = split_at_equal_marginal(0.5, params, curvatures, scales)
    marginal = scales * curvatures * np.exp(curvatures * split) / params
    np.testing.assert_allclose(marginal, marginal[0], rtol=1e-9)
    assert np.dot(split, params) / params.sum() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="outside the bounds"):
        split_at_equal_marginal(0.9, params, curvatures, scales, (0.0, 0.8))


def test_type_curves_fit_each_type_alone_and_floor_the_noise():
    levels = np.array([0.6, 0.7, 0.8])
    truth = [(6.0, 0.02), (11.0, 0.001), (9.0, 0.0)]  # the last type: no damage at all
    damage = np.stack([a * np.exp(c * levels) for c, a in truth], axis=1)
    curvatures, scales = type_curves(damage, levels, floor=0.05)
    for t in range(2):
        own = fit_damage(damage[:, [t]], levels)
        assert curvatures[t] == own[0] and scales[t] == pytest.approx(own[1][0], rel=1e-12)
        assert curvatures[t] == pytest.approx(truth[t][0], rel=0.02)
    assert scales[2] == pytest.approx(0.05 * np.median(scales[:2]), rel=1e-12)
    with pytest.raises(ValueError, match="no layer type's fitted damage is positive"):
        type_curves(np.zeros((3, 2)), levels)


@torch.no_grad()
def _nll_with_type_pruned(engine, ids, probes, name) -> float:
    """Mean next-token NLL of a plain forward of a copy whose layer ``name`` (every block) has
    its probe mask; None prunes nothing."""
    model = copy.deepcopy(engine.model)
    if name is not None:
        for block in range(N_BLOCKS):
            layer = linear_layers(model.model.layers[block])[name]
            layer.weight.data.masked_fill_(probes[block][name], 0)
    logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return float(nll.double())


def _game_spec():
    return {
        "calibration": "0" * 12,
        "ablation": "prune",
        "eval_samples": 3,
        "players": "layers",
        "probe": "1" * 12,
    }


def test_type_game_damage_is_each_type_pruned_in_every_block(tiny, tmp_path):
    path, engine, ids, probes, calibration, masks = tiny
    model = {"path": str(path), "dtype": "float32"}
    runtime = {"device": "cpu", "batch_size": 4, "offload": False}
    out = tmp_path / "damage.json"
    stages.type_game(_game_spec(), runtime, model, calibration, masks, tmp_path / "store", out)
    game = read_json(out)
    assert sorted(game["types"]) == sorted(TYPES) and game["coalitions"] == len(TYPES) + 1
    assert game["attention"] == "self_attn"
    dense = _nll_with_type_pruned(engine, ids[:3], probes, None)
    assert game["dense_nll"] == pytest.approx(dense, rel=1e-5)
    for name, damage in zip(game["types"], game["damage"], strict=True):
        expected = _nll_with_type_pruned(engine, ids[:3], probes, name) - dense
        assert damage == pytest.approx(expected, rel=1e-4, abs=1e-6)
    shapes = _shapes(engine)
    assert game["layer_params"] == [
        {n: int(np.prod(s)) for n, s in block.items()} for block in shapes
    ]
    # a second run finds every coalition in the store and evaluates none
    again = stages.type_game(
        _game_spec(), runtime, model, calibration, masks, tmp_path / "store", tmp_path / "b.json"
    )
    assert again["evaluated"] == 0 and again["damage"] == game["damage"]
    with pytest.raises(ValueError, match="plays 'layers' players"):
        spec = {**_game_spec(), "players": "halves"}
        stages.type_game(spec, runtime, model, calibration, masks, tmp_path / "s", out)


def _type_games(tmp_path, levels, layer_params):
    """Type game files with damage a_t exp(c_t s) per type, and their keys."""
    curves = {t: (6.0 + t_i, 0.01 * (t_i + 1)) for t_i, t in enumerate(TYPES)}
    paths, keys = [], []
    for level in levels:
        spec = {**_game_spec(), "probe": f"{int(level * 100):012d}"}
        game = {
            "spec": spec,
            "types": list(TYPES),
            "damage": [a * np.exp(c * level) for c, a in curves.values()],
            "dense_nll": 3.0,
            "layer_params": layer_params,
            "attention": "self_attn",
            "coalitions": 8,
            "seconds": 1.5,
        }
        paths.append(tmp_path / f"type-{level}.json")
        paths[-1].write_text(json.dumps(game))
        keys.append(cfg.key(spec))
    return paths, keys


def test_budget_splits_each_half_by_the_type_curves_and_keeps_its_mean(tiny, tmp_path):
    _, engine, _, _, calibration, _ = tiny
    players = make_players("halves", _shapes(engine), "self_attn")
    layer_params = [{n: int(np.prod(s)) for n, s in b.items()} for b in _shapes(engine)]
    levels = [0.6, 0.7, 0.8]
    rng = np.random.default_rng(0)
    shapley = []
    for level in levels:
        values = rng.uniform(0.01, 0.05, len(players)) * np.exp(8 * level)
        shapley.append(tmp_path / f"shapley-{level}.json")
        write_scores(shapley[-1], values, players=[p.to_dict() for p in players], source="shapley")
    type_paths, keys = _type_games(tmp_path, levels, layer_params)
    spec = {"levels": levels, "shapley": ["2" * 12] * 3, "type_games": keys}
    curve = tmp_path / "curve.json"
    stages.curve(spec, shapley, curve, type_paths)
    assert read_json(curve)["n_coalitions"] == 3 * 8

    budget_spec = {"method": "svnup-fit", "min": 0.0, "max": 0.99, "floor": 0.05}
    stages.budget(budget_spec, 0.55, calibration, curve, tmp_path / "budget.json")
    plan = read_json(tmp_path / "budget.json")
    game = read_json(curve)["type_game"]
    curvatures, scales = type_curves(game["damage"], levels, 0.05)
    curves = dict(zip(TYPES, zip(curvatures, scales, strict=True), strict=True))
    assert plan["layer_sparsities"] == type_layer_sparsities(
        players, plan["player_sparsities"], layer_params, curves, (0.0, 0.99)
    )
    for player, sparsity in zip(players, plan["player_sparsities"], strict=True):
        layers = plan["layer_sparsities"][player.block]
        weights = [layer_params[player.block][n] for n in player.layers]
        mean = np.dot([layers[n] for n in player.layers], weights) / sum(weights)
        assert mean == pytest.approx(sparsity, abs=1e-12)
        assert len({layers[n] for n in player.layers}) == len(player.layers)  # types differ
    assert plan["achieved"] == pytest.approx(0.55, abs=1e-12)
    assert set(plan["type_curves"]) == set(TYPES)

    with pytest.raises(ValueError, match="is not the type game of this curve"):
        stages.curve({**spec, "type_games": keys[::-1]}, shapley, curve, type_paths)
    with pytest.raises(ValueError, match="one a level"):
        stages.curve(spec, shapley, curve, type_paths[:2])
    with pytest.raises(ValueError, match="without split: types"):
        stages.curve({"levels": levels, "shapley": spec["shapley"]}, shapley, curve, type_paths)


def test_budget_of_whole_blocks_splits_each_block_between_all_its_layers(tiny, tmp_path):
    _, engine, _, _, calibration, _ = tiny
    layer_params = [{n: int(np.prod(s)) for n, s in b.items()} for b in _shapes(engine)]
    levels = [0.6, 0.8]
    shapley = []
    for k, level in enumerate(levels):
        shapley.append(tmp_path / f"shapley-{level}.json")
        write_scores(shapley[-1], np.array([0.2, 0.1, 0.3]) * (k + 1), source="shapley")
    type_paths, keys = _type_games(tmp_path, levels, layer_params)
    curve = tmp_path / "curve.json"
    stages.curve(
        {"levels": levels, "shapley": ["2" * 12] * 2, "type_games": keys},
        shapley,
        curve,
        type_paths,
    )
    spec = {"method": "svnup-fit", "min": 0.0, "max": 0.99, "floor": 0.05}
    stages.budget(spec, 0.5, calibration, curve, tmp_path / "budget.json")
    plan = read_json(tmp_path / "budget.json")
    for block, sparsity in enumerate(plan["sparsities"]):
        layers, params = plan["layer_sparsities"][block], layer_params[block]
        mean = sum(layers[n] * params[n] for n in params) / sum(params.values())
        assert mean == pytest.approx(sparsity, abs=1e-12)
        assert len(set(layers.values())) == len(TYPES)


def _marginal_per_weight(plan, block, layers, curves):
    """a_t c_t exp(c_t s) / w: the predicted damage of one more pruned weight of each layer."""
    sparsity, params = plan["layer_sparsities"][block], plan["layer_params"][block]
    return [
        curves[n][1] * curves[n][0] * np.exp(curves[n][0] * sparsity[n]) / params[n] for n in layers
    ]


@pytest.mark.parametrize("unit", ["halves", "blocks"])
def test_svnup_types_keeps_every_unit_at_the_target_and_equalises_its_marginal_damage(
    tiny, tmp_path, unit
):
    """svnup-types reads no Shapley values: every half (or block) sits at the target, and
    inside it each layer is where the type curves' marginal damage per weight is the same."""
    _, engine, _, _, calibration, _ = tiny
    layer_params = [{n: int(np.prod(s)) for n, s in b.items()} for b in _shapes(engine)]
    levels = [0.6, 0.7, 0.8]
    type_paths, keys = _type_games(tmp_path, levels, layer_params)
    spec = {"levels": levels, "type_games": keys, "floor": 0.05, "unit": unit}
    curve = tmp_path / "curve.json"
    stages.curve(spec, [], curve, type_paths)
    scores = read_json(curve)
    assert scores["values"] is None and scores["source"] == "types"
    assert scores["n_coalitions"] == 3 * 8 and scores["seconds"] == pytest.approx(4.5)
    expected = make_players(unit, _shapes(engine), "self_attn")
    assert scores["players"] == [player.to_dict() for player in expected]

    stages.budget(
        {"method": "svnup-types", "min": 0.0, "max": 0.99},
        0.55,
        calibration,
        curve,
        tmp_path / "budget.json",
    )
    plan = read_json(tmp_path / "budget.json")
    assert plan["player_sparsities"] == [0.55] * len(expected)
    assert plan["sparsities"] == pytest.approx([0.55] * N_BLOCKS, abs=1e-12)
    assert plan["achieved"] == pytest.approx(0.55, abs=1e-12)
    # the game's damage is a_t exp(c_t s) exactly: the fit (on a grid of curvatures) finds it
    damage = np.array(scores["type_game"]["damage"])
    curves = {}
    for t, name in enumerate(scores["type_game"]["types"]):
        c, log_a = np.polyfit(levels, np.log(damage[:, t]), 1)
        fitted = plan["type_curves"][name]
        assert fitted["curvature"] == pytest.approx(c, rel=0.01)  # the grid's step
        assert fitted["scale"] == pytest.approx(np.exp(log_a), rel=0.06)  # and its trade-off
        curves[name] = (fitted["curvature"], fitted["scale"])
    for player in expected:
        layers = plan["layer_sparsities"][player.block]
        weights = [layer_params[player.block][n] for n in player.layers]
        mean = np.dot([layers[n] for n in player.layers], weights) / sum(weights)
        assert mean == pytest.approx(0.55, abs=1e-12)
        marginal = np.array(_marginal_per_weight(plan, player.block, player.layers, curves))
        sparsity = np.array([layers[n] for n in player.layers])
        free = (sparsity > 1e-9) & (sparsity < 0.99 - 1e-9)
        assert free.sum() >= 2
        common = marginal[free][0]
        np.testing.assert_allclose(marginal[free], common, rtol=1e-6)
        # a layer held at the bound would go past it: at max it is cheaper to prune further
        assert np.all(marginal[sparsity >= 0.99 - 1e-9] <= common * (1 + 1e-6))
        assert np.all(marginal[sparsity <= 1e-9] >= common * (1 - 1e-6))


def test_a_curve_of_type_games_alone_needs_them_and_their_attention(tiny, tmp_path):
    _, engine, _, _, _, _ = tiny
    layer_params = [{n: int(np.prod(s)) for n, s in b.items()} for b in _shapes(engine)]
    type_paths, keys = _type_games(tmp_path, [0.6, 0.8], layer_params)
    spec = {"levels": [0.6, 0.8], "type_games": keys, "floor": 0.05, "unit": "halves"}
    curve = tmp_path / "curve.json"
    with pytest.raises(ValueError, match="of a curve of type games alone, which reads none"):
        stages.curve(spec, type_paths, curve, type_paths)
    with pytest.raises(ValueError, match="needs type games"):
        stages.curve({"levels": [0.6, 0.8], "floor": 0.05, "unit": "halves"}, [], curve)
    game = read_json(type_paths[0])
    del game["attention"]
    type_paths[0].write_text(json.dumps(game))
    with pytest.raises(ValueError, match="names no attention module"):
        stages.curve(spec, [], curve, type_paths)
    assert not curve.exists()
