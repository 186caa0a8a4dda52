"""EvoPress: the level ranges, the mutation, the minibatches and the selection against plain
implementations of the reference's loop; the whole search on a tiny random model against one that
scores candidates with full HF forwards; the level database; the exact total; resume after a kill.
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_llama, random_ids

from svnup import config as cfg
from svnup import stages
from svnup.calibration import dense_statistics, probe_masks, save_statistics, sparsegpt_probe
from svnup.evopress import (
    LevelDatabase,
    Unit,
    draw_minibatch,
    generation,
    generation_rng,
    level_range,
    level_sparsity,
    nearest_levels,
    offspring,
    plateaued,
    weights_per_step,
    within_bounds,
)
from svnup.io import JsonLines, read_json
from svnup.models import linear_layers, load_model

N_BLOCKS, TARGET = 3, 0.6
LLAMA_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]


def reference_levels(target, numel, weights_diff, num_levels):
    """The reference's level range of a layer (min_level, max_level of its pruner)."""
    below = min(int(target // (weights_diff / numel)), num_levels)
    above = min(int((1 - target) // (weights_diff / numel)), num_levels)
    return -below, above


def test_level_ranges_are_the_reference_ranges_on_llama_7b():
    numels = [r * c for r, c in LLAMA_7B] * 32
    step = weights_per_step(0.03459, numels)
    assert step == 1_000_022  # the reference's 1,000,000 weights, to 0.003%
    for target in (0.5, 0.6, 0.7, 0.8):
        for rows, cols in LLAMA_7B:
            expected = reference_levels(target, rows * cols, 1_000_000, 8)
            assert level_range(target, rows * cols, 1_000_000, 8) == expected, (target, rows)
    assert level_range(0.7, 4096 * 4096, 1_000_000, 8) == (-8, 5)  # q, k, v, o end at 99.8%
    # a level at exactly 100% is the reference's last; svnup stops below it
    assert reference_levels(0.75, 400, 100, 8) == (-3, 1)
    assert level_range(0.75, 400, 100, 8) == (-3, 0)
    unit = Unit(0, "q", (20, 20), -3, 3)
    assert within_bounds(unit, 0.5, 40, (0.3, 0.75)) == Unit(0, "q", (20, 20), -2, 2)


def reference_offspring(parent, lowest, highest, count, rng):
    """The reference's offspring: a deep copy of the parent, min(randint(1, 3), randint(1, 3))
    switches, each drawing the unit to lower until one can go down and then the unit to raise
    until one can go up; a duplicate is drawn again."""
    children = []
    while len(children) < count:
        child = copy.deepcopy(parent)
        for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
            while True:
                down = rng.randint(0, len(child) - 1)
                if child[down] - 1 >= lowest[down]:
                    break
            while True:
                up = rng.randint(0, len(child) - 1)
                if child[up] + 1 <= highest[up]:
                    break
            child[down] -= 1
            child[up] += 1
        if child in children:
            continue
        children.append(child)
    return children


def _units(ranges):
    return [Unit(0, f"u{i}", (4, 4), lo, hi) for i, (lo, hi) in enumerate(ranges)]


@pytest.mark.parametrize("seed", range(4))
def test_offspring_are_the_references_and_keep_the_total(seed):
    ranges = [(-8, 8), (-8, 5), (-2, 8), (0, 8), (-8, 0), (-8, 8), (-1, 1)]
    units = _units(ranges)
    parent = [3, -8, 0, 0, -2, 7, 0]
    got = offspring(parent, units, 40, random.Random(seed))
    expected = reference_offspring(
        parent, [lo for lo, _ in ranges], [hi for _, hi in ranges], 40, random.Random(seed)
    )
    assert got == expected
    assert len({tuple(child) for child in got}) == 40
    for child in got:
        assert sum(child) == sum(parent)  # every child prunes exactly the parent's weights
        assert all(lo <= level <= hi for level, (lo, hi) in zip(child, ranges, strict=True))
        assert 0 <= sum(abs(c - p) for c, p in zip(child, parent, strict=True)) <= 6


def test_too_few_distinct_offspring_is_an_error_not_a_hang():
    units = _units([(-1, 0), (0, 1)])
    with pytest.raises(ValueError, match="fewer distinct offspring; lower offspring"):
        offspring([0, 0], units, 3, random.Random(0))


def reference_minibatch(rng, n_rows, seqlen, tokens):
    """The reference's minibatch: random rows, no row twice, the last one cut to fit."""
    rows, used = [], 0
    while used < tokens:
        row = rng.randint(0, n_rows - 1)
        if row in [r for r, _ in rows]:
            continue
        take = tokens - used if used + seqlen > tokens else seqlen
        rows.append((row, take))
        used += take
    return tuple(rows)


@pytest.mark.parametrize(("tokens", "cut"), [(96, None), (100, 4), (20, 20), (288, None)])
def test_minibatches_are_the_references(tokens, cut):
    got = draw_minibatch(random.Random(5), 12, 24, tokens)
    assert got == reference_minibatch(random.Random(5), 12, 24, tokens)
    assert sum(n for _, n in got) == tokens and len({r for r, _ in got}) == len(got)
    assert got[-1][1] == (cut or 24)
    with pytest.raises(ValueError, match="exceeds the 12 x 24 calibration tokens"):
        draw_minibatch(random.Random(5), 12, 24, 289)


def fake_fitness(levels, batch) -> float:
    """A deterministic score of an allocation on a minibatch (its rows weigh the units)."""
    weights = np.cos(np.arange(len(levels)) * (1 + sum(r * n for r, n in batch) % 7))
    return float(np.dot(weights, levels) + 0.01 * np.sum(np.square(levels)))


def test_selection_is_the_references_multi_step_selection():
    ranges = [(-8, 8)] * 10
    units = _units(ranges)
    lowest, highest = [lo for lo, _ in ranges], [hi for _, hi in ranges]
    parent = [0] * 10
    for index in range(6):
        calls = []

        def fitness(levels, batch, calls=calls):
            calls.append((list(levels), batch))
            return fake_fitness(levels, batch)

        new, best = generation(
            parent, units, generation_rng(3, index), fitness, 12, [4, 2, 1], [30, 60, 90], 8, 24
        )
        # the reference: offspring, then per step a fresh minibatch, the parent back at the last
        rng = generation_rng(3, index)
        candidates = reference_offspring(parent, lowest, highest, 12, rng)
        scored = 0
        for step, (keep, tokens) in enumerate([(4, 30), (2, 60), (1, 90)]):
            if step == 2 and parent not in candidates:
                candidates.append(parent)
            scored += len(candidates)
            batch = reference_minibatch(rng, 8, 24, tokens)
            scores = [fake_fitness(c, batch) for c in candidates]
            order = np.argsort(scores, kind="stable")[:keep]
            candidates, scores = [candidates[i] for i in order], [scores[i] for i in order]
        assert (new, best) == (candidates[0], scores[0])
        assert len(calls) == scored and scored in (18, 19)
        parent = new
    assert parent != [0] * 10 and sum(parent) == 0


def test_nearest_levels_are_the_l1_nearest_allocation_with_the_exact_total():
    """Against every allocation of small random instances: the levels sum to 0 within each
    unit's range and lie as near the exact levels as any that do; unrepaired ones are rounded."""
    rng = np.random.default_rng(0)
    step, target, unrepaired = 50, 0.5, 0
    for _ in range(300):
        units = [
            Unit(0, str(i), (10, int(rng.integers(5, 40))), -int(rng.integers(0, 4)), 0)
            for i in range(5)
        ]
        units = [Unit(0, u.name, u.shape, u.lowest, int(rng.integers(0, 4))) for u in units]
        sparsities = rng.uniform(0.0, 1.0, size=5)
        exact = np.array(
            [(x - target) * u.numel / step for u, x in zip(units, sparsities, strict=True)]
        )
        got = nearest_levels(units, sparsities.tolist(), target, step)
        assert sum(got) == 0
        assert all(u.lowest <= g <= u.highest for u, g in zip(units, got, strict=True))
        ranges = [range(u.lowest, u.highest + 1) for u in units]
        best = min(
            np.abs(np.array(c) - exact).sum() for c in itertools.product(*ranges) if sum(c) == 0
        )
        assert np.abs(np.array(got) - exact).sum() == pytest.approx(best, abs=1e-9)
        rounded = [
            int(np.clip(np.rint(x), u.lowest, u.highest)) for u, x in zip(units, exact, strict=True)
        ]
        if sum(rounded) == 0:
            unrepaired += 1
            assert got == rounded
    assert unrepaired > 10


def test_a_plateau_is_patience_generations_without_a_better_best():
    assert not plateaued([3.0, 2.0, 2.5, 2.1], None, 0.0)  # off by default
    assert not plateaued([], 1, 0.0)
    assert plateaued([3.0, 2.0, 2.5, 2.1], 2, 0.0)
    assert not plateaued([3.0, 2.0, 2.5, 1.9], 2, 0.0)
    assert not plateaued([3.0, 2.0, 2.5], 2, 0.0)
    # within the tolerance a fall is no improvement, and the best stays where it was
    assert plateaued([3.0, 2.9, 2.86], 2, 0.05)  # neither falls below 2.85
    assert not plateaued([3.0, 2.9, 2.84], 2, 0.05)  # the second, two falls within it, does
    assert not plateaued([3.0, 2.9, 2.86], 2, 0.01)


# --- on a tiny random model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evopress")
    path = build_tiny_llama(root / "model", layers=N_BLOCKS)
    engine, _ = load_model(path, with_tokenizer=False, batch_size=4)  # the stages' micro-batches
    ids = random_ids(96, n=6, seqlen=24)
    calibration = root / "calibration.h5"
    meta = {"spec": {}, "n_blocks": N_BLOCKS, "block_params": engine.block_params()}
    save_statistics(calibration, ids, dense_statistics(engine, ids), meta)
    model = {"path": str(path), "dtype": "float32"}
    databases = {}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        spec = {"calibration": "c", "pruner": pruner, "num_levels": 8, "weights_diff": 0.05}
        databases[pruner] = root / f"levels-{pruner}.h5"
        stages.levels(spec, {"batch_size": 4}, model, TARGET, calibration, databases[pruner])
    return root, model, engine, ids, calibration, databases


def search_spec(**overrides) -> dict:
    spec = {
        "calibration": "c",
        "search": "evopress",
        "pruner": "magnitude",
        "min": 0.0,
        "max": 0.99,
        "probe_pruner": "magnitude",
        "num_levels": 8,
        "weights_diff": 0.05,
        "generations": 3,
        "offspring": 6,
        "survivors": [3, 2, 1],
        "tokens": [20, 48, 100],
        "fitness": "kl",
        "seed": 0,
    }
    return {**spec, **overrides}


def test_databases_are_the_probes_at_the_target_and_each_level_prunes_its_share(tiny):
    _, _, engine, ids, calibration, databases = tiny
    numels = [layer.weight.numel() for b in engine.blocks for layer in linear_layers(b).values()]
    step = weights_per_step(0.05, numels)
    stats = dense_statistics(engine, ids)
    probes = {
        "wanda": probe_masks(engine, stats, TARGET, "wanda"),
        "sparsegpt": list(sparsegpt_probe(engine, ids, TARGET)),
    }
    for pruner, path in databases.items():
        db = LevelDatabase(path)
        assert db.meta["step"] == step and db.meta["dtype"] == "torch.float32"
        assert [(u.block, u.name) for u in db.units][:2] == [
            (0, "self_attn.q_proj"),
            (0, "self_attn.k_proj"),
        ]
        for unit in db.units:
            dense = linear_layers(engine.blocks[unit.block])[unit.name].weight.data
            assert (unit.lowest, unit.highest) == level_range(TARGET, unit.numel, step, 8)
            for level in range(unit.lowest, unit.highest + 1):
                weight = db.weight(unit, level, dense)
                pruned = int((weight == 0).sum())
                share = level_sparsity(TARGET, level, step, unit.numel) * unit.numel
                assert abs(pruned - share) <= (0.5 if pruner != "wanda" else unit.shape[0] / 2)
            if pruner in probes:
                probe = probes[pruner][unit.block][unit.name]
                level0 = db.weight(unit, 0, dense)
                expected = dense.masked_fill(probe, 0) if probe.dtype == torch.bool else probe
                assert torch.equal(level0, expected), (pruner, unit.name)
        db.close()


def _set_levels(model, db, units, levels):
    for unit, level in zip(units, levels, strict=True):
        layer = linear_layers(model.model.layers[unit.block])[unit.name]
        dense = layer.weight.data
        layer.weight.data = db.weight(unit, level, dense)


@torch.no_grad()
def plain_search(model_path, ids, database, spec):
    """The reference's loop written out: offspring, then three selection steps, each scoring every
    candidate with full HF forwards of a copy of the model holding the candidate's level weights,
    KL(dense || pruned) per predicted token by F.kl_div, the dense logits from whole sequences."""
    from transformers import AutoModelForCausalLM

    dense_model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    targets = dense_model(ids).logits
    db = LevelDatabase(database)
    units = db.units
    lowest, highest = [u.lowest for u in units], [u.highest for u in units]

    def kl(levels, batch):
        model = copy.deepcopy(dense_model)
        _set_levels(model, db, units, levels)
        total, count = 0.0, 0
        for row, n in batch:
            logits = model(ids[row : row + 1, :n]).logits[0, :-1]
            target = targets[row, : n - 1]
            loss = F.kl_div(
                logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum"
            )
            total, count = total + float(loss), count + (n - 1)
        return total / count

    parent, history = [0] * len(units), []
    for index in range(spec["generations"]):
        rng = random.Random(f"evopress:{spec['seed']}:{index}")
        candidates = reference_offspring(parent, lowest, highest, spec["offspring"], rng)
        steps = list(zip(spec["survivors"], spec["tokens"], strict=True))
        for step, (keep, tokens) in enumerate(steps):
            if step == len(steps) - 1 and parent not in candidates:
                candidates.append(parent)
            batch = reference_minibatch(rng, ids.shape[0], ids.shape[1], tokens)
            scores = [kl(c, batch) for c in candidates]
            order = np.argsort(scores, kind="stable")[:keep]
            candidates, scores = [candidates[i] for i in order], [scores[i] for i in order]
        parent = candidates[0]
        history.append(scores[0])
    db.close()
    return parent, history


def test_search_is_the_plain_loop_with_full_hf_forwards(tiny):
    root, model, _, ids, calibration, databases = tiny
    spec = search_spec()
    out = root / "search.json"
    stages.search(spec, {"batch_size": 4}, model, TARGET, calibration, out, databases["magnitude"])
    result = read_json(out)
    parent, history = plain_search(model["path"], ids, databases["magnitude"], spec)
    assert result["chosen_levels"] == parent and parent != [0] * len(parent)
    # svnup's KL is the cross-entropy less the dense entropy: float32 cancellation, ~1e-7 nats
    np.testing.assert_allclose([h["fitness"] for h in result["history"]], history, atol=5e-7)
    assert history[-1] < history[0]
    assert result["generations_run"] == 3 and result["stopped"] == "generations"
    assert result["start_levels"] == [0] * len(parent)
    assert not out.with_suffix(".journal").exists()


def test_budget_of_a_search_is_its_levels_with_the_exact_total(tiny):
    root, model, engine, _, calibration, databases = tiny
    out = root / "search-sparsegpt.json"
    spec = search_spec(pruner="sparsegpt", probe_pruner="sparsegpt", generations=2)
    stages.search(spec, {"batch_size": 4}, model, TARGET, calibration, out, databases["sparsegpt"])
    result = read_json(out)
    players, levels, step = result["players"], result["chosen_levels"], result["step"]
    numels = np.array([p["params"] for p in players], dtype=float)
    sparsities = [level_sparsity(TARGET, lv, step, n) for lv, n in zip(levels, numels, strict=True)]
    assert np.dot(sparsities, numels) == pytest.approx(TARGET * numels.sum(), abs=1e-6)
    budget_spec = {"method": "evopress", "min": 0.0, "max": 0.99}
    stages.budget(budget_spec, TARGET, calibration, out, root / "budget.json")
    plan = read_json(root / "budget.json")
    assert plan["achieved"] == pytest.approx(TARGET, abs=1e-12)
    np.testing.assert_allclose(plan["player_sparsities"], sparsities, atol=1e-12)
    names = [f"{b}.{n}" for b, block in enumerate(engine.blocks) for n in linear_layers(block)]
    assert [p["name"] for p in players] == names
    for player, sparsity in zip(players, sparsities, strict=True):
        layer = player["layers"][0]
        assert plan["layer_sparsities"][player["block"]][layer] == pytest.approx(sparsity)


def test_killed_search_resumes_after_its_last_generation(tiny, monkeypatch):
    from svnup.evopress import LevelScorer

    root, model, _, _, calibration, databases = tiny
    spec = search_spec(generations=4, offspring=4, fitness="ppl")
    whole = root / "whole.json"
    stages.search(spec, {"batch_size": 4}, model, TARGET, calibration, whole, databases["wanda"])

    calls = []
    original = LevelScorer.__call__
    monkeypatch.setattr(LevelScorer, "__call__", lambda *a: calls.append(1) or original(*a))
    append = JsonLines.append

    def killed(journal, row):
        if row["generation"] == 2:
            raise KeyboardInterrupt  # killed while journalling generation 2
        append(journal, row)

    resumed = root / "resumed.json"
    monkeypatch.setattr(JsonLines, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        stages.search(
            spec, {"batch_size": 4}, model, TARGET, calibration, resumed, databases["wanda"]
        )
    assert not resumed.exists()
    assert [row["generation"] for row in JsonLines(resumed.with_suffix(".journal")).rows()] == [
        0,
        1,
    ]
    first = len(calls)
    monkeypatch.setattr(JsonLines, "append", append)
    stages.search(spec, {"batch_size": 4}, model, TARGET, calibration, resumed, databases["wanda"])
    a, b = read_json(whole), read_json(resumed)
    assert a["chosen_levels"] == b["chosen_levels"]
    assert [h["fitness"] for h in a["history"]] == [h["fitness"] for h in b["history"]]
    per_generation = [h["evaluations"] for h in a["history"]]
    assert len(calls) - first == sum(per_generation[2:])  # generations 0 and 1 are not re-run
    assert first == sum(per_generation[:3])


def test_more_generations_continue_a_finished_search_to_the_fresh_runs_result(tiny, monkeypatch):
    """Raising ``generations`` (a new key folder) continues the finished shorter search beside it,
    scoring only the new generations, to what a search run from scratch gives; a neighbour that
    differs in anything else is not continued."""
    from svnup.evopress import LevelScorer

    root, model, _, _, calibration, databases = tiny
    args = ({"batch_size": 4}, model, TARGET, calibration)
    spec = search_spec(generations=4, offspring=4, fitness="ppl")
    fresh = root / "fresh" / "k4" / "s.json"
    stages.search(spec, *args, fresh, databases["wanda"])
    searches = root / "continued"
    stages.search({**spec, "generations": 2}, *args, searches / "k2" / "s.json", databases["wanda"])
    stages.search(
        {**spec, "seed": 1, "generations": 3},
        *args,
        searches / "other" / "s.json",
        databases["wanda"],
    )

    calls = []
    original = LevelScorer.__call__
    monkeypatch.setattr(LevelScorer, "__call__", lambda *a: calls.append(1) or original(*a))
    continued = searches / "k4" / "s.json"
    stages.search(spec, *args, continued, databases["wanda"])
    a, b = read_json(fresh), read_json(continued)
    assert a["chosen_levels"] == b["chosen_levels"]
    assert [h["fitness"] for h in a["history"]] == [h["fitness"] for h in b["history"]]
    assert b["generations_run"] == 4 and b["stopped"] == "generations"
    assert len(calls) == sum(h["evaluations"] for h in a["history"][2:])
    assert not continued.with_suffix(".journal").exists()


def test_bad_settings_are_named_before_the_search(tiny, tmp_path):
    root, model, _, _, calibration, databases = tiny
    run = lambda spec, database=databases["magnitude"]: stages.search(  # noqa: E731
        spec, {}, model, TARGET, calibration, tmp_path / "s.json", database
    )
    with pytest.raises(ValueError, match="exceeds the 6 x 24 calibration tokens"):
        run(search_spec(tokens=[20, 48, 145]))
    with pytest.raises(ValueError, match="3 selection steps in survivors but 2 in tokens"):
        run(search_spec(tokens=[20, 48]))
    with pytest.raises(ValueError, match="pass --database"):
        run(search_spec(), None)
    with pytest.raises(ValueError, match="holds levels around 0.6, not 0.5"):
        stages.search(
            search_spec(), {}, model, 0.5, calibration, tmp_path / "s.json", databases["wanda"]
        )
    with pytest.raises(ValueError, match="widen allocation.min and max"):
        run(search_spec(min=0.6, max=0.6))
    spec = {"calibration": "c", "pruner": "wanda", "num_levels": 8, "weights_diff": 1.0}
    with pytest.raises(ValueError, match="weights_diff is too large"):
        stages.levels(spec, {}, model, 0.99, calibration, tmp_path / "l.h5")
    assert not (tmp_path / "l.h5").exists()


def test_scores_do_not_depend_on_the_caches(tiny):
    """Dense distributions recomputed per candidate and no cache of level weights give the same
    fitness as the kept ones; only the time changes."""
    from svnup.evopress import LevelScorer

    _, _, engine, ids, _, databases = tiny
    db = LevelDatabase(databases["sparsegpt"])
    rng = random.Random(1)
    batches = [draw_minibatch(rng, 6, 24, tokens) for tokens in (30, 100)]
    candidates = offspring([0] * len(db.units), db.units, 5, rng)
    kept = LevelScorer(engine, ids, db, db.units)
    bare = LevelScorer(engine, ids, db, db.units, cache_bytes=0, reference_bytes=0)
    try:
        for batch in batches:
            for levels in candidates:
                assert bare(levels, batch) == pytest.approx(kept(levels, batch), rel=1e-6)
        assert not bare._cache and kept._cache
    finally:
        kept.restore()
        db.close()
    dense = [layer.weight.data for b in engine.blocks for layer in linear_layers(b).values()]
    assert all(int((w == 0).sum()) == 0 for w in dense)  # restored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_database_keeps_values_in_the_models_dtype(tmp_path, dtype):
    from svnup.evopress import save_database

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 8, generator=gen).to(dtype)
    unit = Unit(0, "mlp.up_proj", (6, 8), -1, 1)
    levels = {
        level: dense.masked_fill(torch.rand(6, 8, generator=gen) < 0.5, 0) for level in (-1, 0, 1)
    }
    save_database(tmp_path / "db.h5", [(unit, levels)], {"step": 1})
    db = LevelDatabase(tmp_path / "db.h5")
    assert db.units == [unit] and db.meta == {"step": 1}
    for level, weight in levels.items():
        got = db.weight(unit, level, dense)
        assert got.dtype == dtype and torch.equal(got, weight)
    with pytest.raises(ValueError, match="has no level 2"):
        db.weight(unit, 2, dense)
    db.close()


def _start_budget(root, engine, name, per_layer):
    """A budget to start from, written by hand: blocks at 0.45, 0.6 and 0.75, or (per_layer) the
    attention of each block 0.1 below and the MLP 0.1 above its block's."""
    blocks = [0.45, 0.6, 0.75]
    plan = {"spec": {"method": "svnup-fit", "name": name}, "target": TARGET, "sparsities": blocks}
    if per_layer:
        plan["layer_sparsities"] = [
            {n: s + (0.1 if n.startswith("mlp") else -0.1) for n in linear_layers(block)}
            for block, s in zip(engine.blocks, blocks, strict=True)
        ]
    path = root / f"start-{name}.json"
    path.write_text(json.dumps(plan))
    return path, cfg.key(plan["spec"])


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_seeded_search_starts_at_the_budgets_nearest_levels(tiny, per_layer):
    root, model, engine, _, calibration, databases = tiny
    start, budget_key = _start_budget(root, engine, f"seed-{per_layer}", per_layer)
    spec = search_spec(generations=2, start="svnup-fit", start_budget=budget_key)
    out = root / f"seeded-{per_layer}.json"
    stages.search(
        spec, {"batch_size": 4}, model, TARGET, calibration, out, databases["magnitude"], start
    )
    result = read_json(out)
    db = LevelDatabase(databases["magnitude"])
    units = [within_bounds(u, TARGET, db.meta["step"], (0.0, 0.99)) for u in db.units]
    db.close()
    plan = read_json(start)
    if per_layer:
        sparsities = [plan["layer_sparsities"][u.block][u.name] for u in units]
    else:
        sparsities = [plan["sparsities"][u.block] for u in units]
    expected = nearest_levels(units, sparsities, TARGET, db.meta["step"])
    assert result["start_levels"] == expected and sum(expected) == 0
    assert sum(abs(level) for level in expected) > 4 * 2 * 3  # far from uniform
    # two generations of at most three switches each from the start
    moved = sum(abs(a - b) for a, b in zip(result["chosen_levels"], expected, strict=True))
    assert moved <= 2 * 2 * 3
    assert sum(result["chosen_levels"]) == 0 and result["stopped"] == "generations"


def test_a_seeded_search_needs_its_own_start_budget(tiny, tmp_path):
    root, model, engine, _, calibration, databases = tiny
    start, budget_key = _start_budget(root, engine, "own", False)
    spec = search_spec(start="svnup-fit", start_budget=budget_key)
    run = lambda spec, start: stages.search(  # noqa: E731
        spec, {}, model, TARGET, calibration, tmp_path / "s.json", databases["magnitude"], start
    )
    with pytest.raises(ValueError, match="pass --start"):
        run(spec, None)
    with pytest.raises(ValueError, match="is not the budget this search starts from"):
        run({**spec, "start_budget": "0" * 12}, start)
    assert not (tmp_path / "s.json").exists()


def test_a_search_stops_on_a_plateau_and_resumes_to_the_same_stop(tiny, monkeypatch):
    """With patience 1 and a 90% tolerance the second generation cannot improve enough: the search
    stops after it, says so, and a search killed while journalling it resumes to the same end."""
    root, model, engine, _, calibration, databases = tiny
    start, budget_key = _start_budget(root, engine, "plateau", True)
    spec = search_spec(
        generations=6, patience=1, tolerance=0.9, start="svnup-fit", start_budget=budget_key
    )
    args = ({"batch_size": 4}, model, TARGET, calibration)
    whole = root / "plateau.json"
    stages.search(spec, *args, whole, databases["wanda"], start)
    result = read_json(whole)
    assert result["generations_run"] == len(result["history"]) == 2
    assert result["stopped"] == "plateau"
    full = root / "no-plateau.json"
    unstopped = {**spec, "generations": 2, "patience": None}
    stages.search(unstopped, *args, full, databases["wanda"], start)
    assert read_json(full)["chosen_levels"] == result["chosen_levels"]

    append = JsonLines.append

    def killed(journal, row):
        if row["generation"] == 1:
            raise KeyboardInterrupt
        append(journal, row)

    resumed = root / "plateau-resumed.json"
    monkeypatch.setattr(JsonLines, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        stages.search(spec, *args, resumed, databases["wanda"], start)
    monkeypatch.setattr(JsonLines, "append", append)
    stages.search(spec, *args, resumed, databases["wanda"], start)
    again = read_json(resumed)
    assert again["chosen_levels"] == result["chosen_levels"]
    assert again["start_levels"] == result["start_levels"] != [0] * len(result["start_levels"])
    assert [h["fitness"] for h in again["history"]] == [h["fitness"] for h in result["history"]]
    assert again["stopped"] == "plateau"


@pytest.mark.parametrize("fitness", ["kl", "ppl"])
def test_prefix_sharing_gives_the_full_forwards_scores_bit_for_bit(tiny, fitness):
    """Candidates a few switches from a base score exactly as with full forwards, whether every
    block's base states fit, only some or none; the shared ones run fewer blocks."""
    from svnup.evopress import LevelScorer, mutate

    _, _, engine, ids, _, databases = tiny
    db = LevelDatabase(databases["sparsegpt"])
    rng = random.Random(3)
    base = [0] * len(db.units)
    for _ in range(4):
        base = mutate(base, db.units, rng)
    candidates = [*offspring(base, db.units, 8, rng), base]
    batches = [draw_minibatch(rng, 6, 24, tokens) for tokens in (30, 100)]
    hidden = engine.model.config.hidden_size
    one_state = sum(n for _, n in batches[1]) * hidden * 4  # rows of the larger minibatch
    try:
        full = LevelScorer(engine, ids, db, db.units, fitness)
        expected = [[full(c, batch) for c in candidates] for batch in batches]
        full.restore()
        for prefix_bytes, fewer in ((1 << 30, True), (2 * one_state, True), (0, False)):
            shared = LevelScorer(engine, ids, db, db.units, fitness, prefix_bytes=prefix_bytes)
            shared.base = base
            got = [[shared(c, batch) for c in candidates] for batch in batches]
            assert got == expected, prefix_bytes
            assert (shared.blocks_run < full.blocks_run) == fewer, prefix_bytes
            shared.restore()
    finally:
        db.close()
    dense = [layer.weight.data for b in engine.blocks for layer in linear_layers(b).values()]
    assert all(int((w == 0).sum()) == 0 for w in dense)  # restored
