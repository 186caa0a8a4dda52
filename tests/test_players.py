"""Attention and MLP halves, and single linear layers, as players: the evaluator against plain HF
forwards, the budget per half, pruning per layer, the recipe, and the config's cache keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama, random_ids
from workflow_fixture import tiny_config

from svnup import config as cfg
from svnup import export, preflight, stages
from svnup.allocation import allocate
from svnup.calibration import dense_statistics, probe_masks, probe_shapes, save_probe
from svnup.evaluator import CoalitionEvaluator
from svnup.families import FAMILIES
from svnup.io import read_json, write_scores
from svnup.models import linear_layers, load_model
from svnup.players import block_sparsities, layer_sparsities, make_players, players_per_block
from svnup.pruning import prune_model

N_BLOCKS = 4
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-halves"), layers=N_BLOCKS)
    engine, _ = load_model(path, with_tokenizer=False, batch_size=3)
    calibration = random_ids(96, n=6, seqlen=24)
    probes = probe_masks(engine, dense_statistics(engine, calibration), 0.6)
    return path, engine, calibration, dict(enumerate(probes))


def _shapes(engine):
    return [{n: tuple(m.weight.shape) for n, m in linear_layers(b).items()} for b in engine.blocks]


def _halves(engine):
    return make_players("halves", _shapes(engine), "self_attn")


@torch.no_grad()
def _naive_nll(engine, ids, ablated_layers, probes) -> float:
    """Summed next-token NLL of a plain HF forward of a copy of the model whose named layers
    ({block: [layer, ...]}) carry their probe masks."""
    model = copy.deepcopy(engine.model)
    for block, names in ablated_layers.items():
        layers = linear_layers(model.model.layers[block])
        for name in names:
            layers[name].weight.data.masked_fill_(probes[block][name], 0)
    logits = model(input_ids=ids, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float(nll.double().sum())


def _evaluate(evaluator, masks) -> dict[int, float]:
    results = {}
    evaluator.evaluate(masks, lambda mask, nll, tokens, seconds: results.__setitem__(mask, nll))
    return results


def test_halves_split_each_family_at_its_attention_module():
    assert {family.attention for family in FAMILIES.values()} == {"self_attn"}
    shapes = [{"self_attn.q_proj": (8, 4), "self_attn.out_proj": (4, 8), "fc1": (16, 4)}]
    players = make_players("halves", shapes, "self_attn")
    assert [(p.name, p.layers, p.params) for p in players] == [
        ("0.attention", ("self_attn.q_proj", "self_attn.out_proj"), 64),
        ("0.mlp", ("fc1",), 64),
    ]
    blocks = make_players("blocks", shapes, "self_attn")
    assert [(p.name, p.params) for p in blocks] == [("0", 128)]
    with pytest.raises(ValueError, match="block 0 has no mlp linear layers"):
        make_players("halves", [{"self_attn.q_proj": (2, 2)}], "self_attn")


def test_halves_of_opt_put_fc1_and_fc2_in_the_mlp(tiny_opt_path):
    engine, _ = load_model(tiny_opt_path, with_tokenizer=False)
    players = make_players("halves", _shapes(engine), engine.family.attention)
    assert players[1].layers == ("fc1", "fc2")
    assert all(name.startswith("self_attn.") for name in players[0].layers)
    assert sum(p.params for p in players) == sum(engine.block_params())


def test_half_coalitions_equal_plain_forwards_with_those_layers_masked(tiny):
    _, engine, calibration, probes = tiny
    ids = calibration[:4]
    players = _halves(engine)
    evaluator = CoalitionEvaluator(engine, ids, probes=probes, players=players)
    # dense; one half; both halves of a block; halves of different blocks; every half
    masks = [0, 1 << 2, 1 << 3, 0b1100, 0b10010001, 0b01100110, (1 << 2 * N_BLOCKS) - 1]
    got = _evaluate(evaluator, masks)
    for mask in masks:
        ablated = {}
        for bit, player in enumerate(players):
            if (mask >> bit) & 1:
                ablated.setdefault(player.block, []).extend(player.layers)
        expected = _naive_nll(engine, ids, ablated, probes)
        assert got[mask] == pytest.approx(expected, rel=1e-5), hex(mask)
    assert evaluator.block_forwards < len(masks) * N_BLOCKS  # prefixes are shared


def test_layers_are_each_linear_layer_of_each_block_in_block_order(tiny, tiny_opt_path):
    _, engine, _, _ = tiny
    players = make_players("layers", _shapes(engine), "self_attn")
    assert [p.name for p in players] == [
        f"{b}.{n}" for b in range(N_BLOCKS) for n in ATTENTION + MLP
    ]
    assert [p.layers for p in players[:2]] == [(ATTENTION[0],), (ATTENTION[1],)]
    assert [p.params for p in players[:7]] == [32 * 32, 16 * 32, 16 * 32, 32 * 32, *[64 * 32] * 3]
    assert sum(p.params for p in players) == sum(engine.block_params())
    opt, _ = load_model(tiny_opt_path, with_tokenizer=False)
    opt_players = make_players("layers", _shapes(opt), opt.family.attention)
    assert len(opt_players) == 6 * opt.n_blocks
    with pytest.raises(ValueError, match="count them on the model"):
        players_per_block("layers")


def test_layer_coalitions_equal_plain_forwards_with_those_layers_masked(tiny):
    _, engine, calibration, probes = tiny
    ids = calibration[:4]
    players = make_players("layers", _shapes(engine), "self_attn")
    evaluator = CoalitionEvaluator(engine, ids, probes=probes, players=players)
    every = (1 << len(players)) - 1
    # dense; q of block 0; k and down of block 1; one layer in each block; all of block 2 layer by
    # layer; every layer but one; every layer
    masks = [0, 1, (1 << 8) | (1 << 13), sum(1 << (7 * b + b) for b in range(N_BLOCKS))]
    masks += [0b1111111 << 14, every ^ (1 << 20), every]
    got = _evaluate(evaluator, masks)
    for mask in masks:
        ablated = {}
        for bit, player in enumerate(players):
            if (mask >> bit) & 1:
                ablated.setdefault(player.block, []).extend(player.layers)
        expected = _naive_nll(engine, ids, ablated, probes)
        assert got[mask] == pytest.approx(expected, rel=1e-5), hex(mask)
    blocks = _evaluate(CoalitionEvaluator(engine, ids, probes=probes), [0b0100])
    assert got[0b1111111 << 14] == pytest.approx(blocks[0b0100], rel=1e-6)
    assert evaluator.block_forwards < len(masks) * N_BLOCKS


def test_both_halves_of_a_block_are_the_whole_block(tiny):
    _, engine, calibration, probes = tiny
    ids = calibration[:4]
    blocks = _evaluate(CoalitionEvaluator(engine, ids, probes=probes), [0b0101, 0b1010])
    halves = _evaluate(
        CoalitionEvaluator(engine, ids, probes=probes, players=_halves(engine)),
        [0b00110011, 0b11001100],
    )
    assert halves[0b00110011] == pytest.approx(blocks[0b0101], rel=1e-6)
    assert halves[0b11001100] == pytest.approx(blocks[0b1010], rel=1e-6)


def test_half_masks_beyond_the_players_and_skip_ablation_are_refused(tiny):
    _, engine, calibration, probes = tiny
    evaluator = CoalitionEvaluator(engine, calibration[:2], probes=probes, players=_halves(engine))
    with pytest.raises(ValueError, match="outside 0 .. 2\\*\\*8 - 1"):
        evaluator.evaluate([1 << 8], lambda *a: None)
    with pytest.raises(ValueError, match="ablation 'skip' removes whole blocks"):
        CoalitionEvaluator(engine, calibration[:2], ablation="skip", players=_halves(engine))


def _calibration_file(path, engine):
    from svnup.io import open_h5

    with open_h5(path, "w") as f:
        f.attrs["meta"] = json.dumps({"block_params": engine.block_params()})
    return path


def test_budget_allocates_each_half_and_keeps_the_mean_on_target(tiny, tmp_path):
    _, engine, _, _ = tiny
    players = _halves(engine)
    values = [0.9, 0.1, 0.5, 0.3, 0.2, 0.7, 0.05, 0.4]
    scores = tmp_path / "scores.json"
    write_scores(scores, values, players=[p.to_dict() for p in players], source="shapley")
    calibration = _calibration_file(tmp_path / "calibration.h5", engine)
    spec = {"method": "svnup", "min": 0.0, "max": 0.99, "lambda": 0.2}
    stages.budget(spec, 0.6, calibration, scores, tmp_path / "budget.json")
    plan = read_json(tmp_path / "budget.json")

    params = np.array([p.params for p in players], float)
    expected = allocate("svnup", np.array(values), params, 0.6, (0.0, 0.99), **{"lambda": 0.2})
    np.testing.assert_allclose(plan["player_sparsities"], expected, rtol=0, atol=1e-12)
    assert float(np.dot(plan["player_sparsities"], params) / params.sum()) == pytest.approx(0.6)
    assert plan["achieved"] == pytest.approx(0.6, abs=1e-12)
    for block in range(N_BLOCKS):
        attention, mlp = expected[2 * block], expected[2 * block + 1]
        assert plan["layer_sparsities"][block] == {
            **dict.fromkeys(ATTENTION, attention),
            **dict.fromkeys(MLP, mlp),
        }
        weights = params[2 * block : 2 * block + 2]
        mean = (attention * weights[0] + mlp * weights[1]) / weights.sum()
        assert plan["sparsities"][block] == pytest.approx(mean, abs=1e-12)
    assert plan["importance"] == values

    other = [{**p.to_dict(), "params": p.params + 1} for p in players]
    write_scores(scores, values, players=other, source="shapley")
    with pytest.raises(ValueError, match="belong to another model"):
        stages.budget(spec, 0.6, calibration, scores, tmp_path / "other.json")


def test_layer_sparsities_prune_each_layer_to_its_own_target(tiny):
    path, _, calibration, _ = tiny
    players = make_players(
        "halves", _shapes(load_model(path, with_tokenizer=False)[0]), "self_attn"
    )
    sparsities = [0.3, 0.7, 0.5, 0.5, 0.8, 0.2, 0.6, 0.4]
    layers = layer_sparsities(players, sparsities, N_BLOCKS)
    blocks = block_sparsities(players, sparsities, N_BLOCKS)
    for method in ("wanda", "sparsegpt"):
        engine, _ = load_model(path, with_tokenizer=False)
        reports = prune_model(engine, calibration, blocks, method, layer_sparsities=layers)
        for block, report in enumerate(reports):
            assert report.target == blocks[block]
            for layer in report.layers:
                # each row (Wanda) or column block (SparseGPT) prunes its share, rounded
                columns = linear_layers(engine.blocks[block])[layer.name].in_features
                target = layers[block][layer.name]
                assert abs(layer.sparsity - target) <= 0.5 / columns + 1e-9, (block, layer.name)

    # one sparsity for every layer of a block is exactly the per-block path
    same, whole = (
        load_model(path, with_tokenizer=False)[0],
        load_model(path, with_tokenizer=False)[0],
    )
    uniform = [0.5, 0.6, 0.4, 0.55]
    per_layer = [
        dict.fromkeys(linear_layers(b), s) for b, s in zip(same.blocks, uniform, strict=True)
    ]
    prune_model(same, calibration, uniform, "sparsegpt", layer_sparsities=per_layer)
    prune_model(whole, calibration, uniform, "sparsegpt")
    for a, b in zip(same.blocks, whole.blocks, strict=True):
        for name, layer in linear_layers(a).items():
            assert torch.equal(layer.weight, linear_layers(b)[name].weight), name

    with pytest.raises(ValueError, match="block 0: layer sparsities name"):
        prune_model(
            same, calibration, uniform, "wanda", layer_sparsities=[{"mlp.up_proj": 0.5}] * 4
        )


def test_recipe_of_a_layer_budget_names_every_linear_layer():
    plan = {
        "sparsities": [0.55],
        "layer_sparsities": [{"self_attn.q_proj": 0.4, "mlp.down_proj": 0.7}],
    }
    sparsities, targets = export.recipe_targets(plan, ["model.layers.0"])
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert sparsities == [0.4, 0.7]
    arguments = export.recipe("wanda", sparsities, targets)["sparsity_stage"]
    arguments = arguments["sparsity_modifiers"]["WandaPruningModifier"]
    assert arguments["targets"] == targets and arguments["sparsity"] == [0.4, 0.7]
    assert export.recipe_targets({"sparsities": [0.5]}, ["model.layers.0"]) == (
        [0.5],
        ["model.layers.0"],
    )


def test_probe_shapes_are_the_layers_weight_shapes(tiny, tmp_path):
    _, engine, _, probes = tiny
    save_probe(tmp_path / "masks.h5", [probes[b] for b in range(N_BLOCKS)], {})
    assert probe_shapes(tmp_path / "masks.h5") == _shapes(engine)


def test_players_are_a_store_key_only_when_not_whole_blocks():
    config = {
        "models": {"m": {"path": "m"}},
        "calibration": {"dataset": "c4", "nsamples": 4, "seed": 0},
        "shapley": {
            "estimator": "loo",
            "eval_samples": 4,
            "ablation": "prune",
            "probe_sparsity": 0.7,
            "probe_pruner": "wanda",
            "targets": "text",
        },
    }
    settings = cfg.model_settings(
        {**config, "allocation": {}, "pruner": "wanda", "evaluation": {}}, "m"
    )
    blocks = cfg.store_spec(settings)
    assert "players" not in blocks
    explicit = {**settings, "shapley": {**settings["shapley"], "players": "blocks"}}
    assert cfg.store_spec(explicit) == blocks
    halves = {**settings, "shapley": {**settings["shapley"], "players": "halves"}}
    assert cfg.store_spec(halves) == {**blocks, "players": "halves"}
    assert cfg.key(cfg.store_spec(halves)) != cfg.key(blocks)
    layers = {**settings, "shapley": {**settings["shapley"], "players": "layers"}}
    assert cfg.store_spec(layers) == {**blocks, "players": "layers"}
    assert len({cfg.key(cfg.store_spec(s)) for s in (settings, halves, layers)}) == 3


def test_layer_players_are_counted_from_the_config_without_weights(tiny, tiny_opt_path):
    path, _, _, _ = tiny
    config = tiny_config(**{"shapley.players": "layers"})
    settings = {**config["models"]["tiny"], "path": str(path), "revision": "main"}
    settings = {**settings, "shapley": config["shapley"]}
    assert cfg.n_players(settings) == 7 * N_BLOCKS
    assert cfg.n_players({**settings, "path": str(tiny_opt_path)}) == 6 * 3
    halves = {**settings, "shapley": {**config["shapley"], "players": "halves"}}
    assert cfg.n_players(halves) == 2 * N_BLOCKS
    demo = {**settings, "path": str(Path(__file__).parents[1] / "demo" / "model")}
    assert cfg.n_players(demo) == 7 * 8  # the shipped demo model: a LLaMA of 8 blocks


def test_estimator_is_checked_against_the_layer_count(tiny):
    path, _, _, _ = tiny
    config = tiny_config(**{"shapley.players": "layers", "shapley.estimator": "exact"})
    config["models"]["tiny"]["path"] = str(path)
    settings = cfg.model_settings(cfg.validate(config), "tiny")
    message = "exact needs 2\\^28 coalitions for the game's 28 players \\(the linear layers of 4 "
    with pytest.raises(cfg.ConfigError, match=message):
        preflight.check_estimator(settings, N_BLOCKS, "tiny")
    swsv = {**settings, "shapley": {**settings["shapley"], "estimator": "swsv", "window": 8}}
    preflight.check_estimator(swsv, N_BLOCKS, "tiny")  # 8 of 28 layers: more than the 4 blocks
