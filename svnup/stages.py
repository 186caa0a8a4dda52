"""The pipeline's stages, each a function from files to files.

A workflow rule calls exactly one of these through ``python -m svnup STAGE``; they are equally
usable from Python. Every output is written atomically, so a failed or killed stage leaves nothing
that looks finished. ``spec`` is the stage's cache-key material (see ``svnup.config``) and
``runtime`` how to run it (device, batch size, offload).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from svnup import __version__
from svnup.io import (
    JsonLines,
    atomic_path,
    corrupt,
    open_h5,
    read_json,
    read_meta,
    read_scores,
    write_json,
    write_scores,
)

log = logging.getLogger("svnup")


def versions(*extra: str) -> dict:
    """Versions of everything that can change a number, recorded beside the numbers (and of the
    ``extra`` packages a stage also uses)."""
    found = {"svnup": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "datasets", "h5py", "numpy", *extra):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _load(spec_model: dict, runtime: dict, with_tokenizer: bool = True, path: str | None = None):
    """The model at ``path`` (the spec's model by default): a checkpoint folder or hub id, or a
    folder of pruned layers (``prune --layers-only``), applied to the spec's dense model."""
    from svnup.content import check_model_dir
    from svnup.models import load_model

    layers = _pruned_layers_file(path)
    if layers is not None:
        from svnup.pruning import apply_pruned_layers

        engine, tokenizer = _load(spec_model, runtime, with_tokenizer)
        apply_pruned_layers(engine, layers)
        return engine, tokenizer
    path = path or spec_model["path"]
    if Path(path).expanduser().is_dir():  # a damaged file: one line, not a loader's traceback
        check_model_dir(Path(path).expanduser(), fix=_model_fix(spec_model, path))
    return load_model(
        path,
        dtype=spec_model["dtype"],
        device=runtime.get("device", "cpu"),
        offload=runtime.get("offload", "auto"),
        batch_size=runtime.get("batch_size", 8),
        with_tokenizer=with_tokenizer,
        revision=spec_model.get("revision") if path == spec_model["path"] else None,
    )


def _pruned_layers_file(path: str | Path | None) -> Path | None:
    from svnup.content import PRUNED_LAYERS

    if path is None:
        return None
    found = Path(path).expanduser() / PRUNED_LAYERS
    return found if found.is_file() else None


def _model_fix(spec_model: dict, path: str) -> str:
    from svnup.content import RESTORE, refold

    return RESTORE if path == spec_model["path"] else refold(path)


def convert(gguf: Path, out_dir: Path) -> None:
    """A GGUF file's model and tokenizer as a float32 Hugging Face folder (the folder's path is
    keyed by the file's content, which ``conversion.json`` beside the weights records)."""
    from svnup import gguf_files

    start = time.perf_counter()
    sha256 = gguf_files.digest(Path(gguf).resolve())
    with atomic_path(out_dir) as tmp:
        gguf_files.convert(Path(gguf), tmp)
        write_json(
            tmp / "conversion.json",
            {
                "gguf": str(gguf),
                "sha256": sha256,
                "seconds": time.perf_counter() - start,
                "versions": versions("gguf"),
            },
        )
    log.info("converted %s (sha256 %s) into %s", gguf, sha256[:12], out_dir)


def calibrate(spec: dict, runtime: dict, out: Path) -> None:
    """Sample calibration sequences and record the dense model's per-layer input statistics."""
    from svnup.calibration import dense_statistics, save_statistics
    from svnup.data import calibration_samples, check_source, resolve_protocol
    from svnup.specs import check_context

    check_source(spec["dataset"], "train")  # before the model loads, which can take minutes
    check_context(spec["model"], spec["seqlen"])
    engine, tokenizer = _load(spec["model"], runtime)
    ids = calibration_samples(
        tokenizer,
        spec["dataset"],
        nsamples=spec["nsamples"],
        seqlen=spec["seqlen"],
        seed=spec["seed"],
        protocol=spec.get("protocol"),
    )
    log.info("calibration: %d sequences x %d tokens from %s", *ids.shape, spec["dataset"])
    start = time.perf_counter()
    stats = dense_statistics(engine, ids)
    meta = {
        "spec": spec,
        "protocol": resolve_protocol(spec["dataset"], spec.get("protocol")),
        "n_blocks": engine.n_blocks,
        "block_params": engine.block_params(),
        "seconds": time.perf_counter() - start,
        "versions": versions(),
    }
    save_statistics(out, ids, stats, meta)


def probe(spec: dict, runtime: dict, model: dict, calibration: Path, out: Path) -> None:
    """What each block becomes when a coalition ablates it: masks from the dense statistics, or
    for SparseGPT the weights it reconstructs from the dense inputs."""
    from svnup.calibration import iter_probe_masks, load_statistics, save_probe, sparsegpt_probe

    engine, _ = _load(model, runtime, with_tokenizer=False)
    ids, stats, _ = load_statistics(calibration)
    start = time.perf_counter()
    if spec["pruner"] == "sparsegpt":
        blocks = sparsegpt_probe(engine, ids, spec["sparsity"])
    else:
        blocks = iter_probe_masks(engine, stats, spec["sparsity"], spec["pruner"])
    save_probe(out, blocks, {"spec": spec, "versions": versions()})
    seconds = time.perf_counter() - start
    log.info("probe %s at %g: %.1f s", spec["pruner"], spec["sparsity"], seconds)


def coalitions(
    spec: dict,
    runtime: dict,
    model: dict,
    estimator: dict,
    job: str,
    calibration: Path,
    masks: Path | None,
    store: Path,
    out: Path,
) -> dict:
    """Evaluate the coalitions of one job that the store does not hold yet; write the job's records.

    Results are journalled per coalition, so a killed job resumes where it stopped. The job first
    claims its coalitions in the store; one already claimed by a running job (of this or another
    estimator) is left to it and waited for, and taken over if that job dies.
    """
    from svnup.calibration import load_statistics
    from svnup.shapley import coalition_jobs, make_estimator
    from svnup.store import CoalitionStore, write_records

    ids, _, meta = load_statistics(calibration)
    n_blocks = meta["n_blocks"]
    players = _game_players(spec, model, masks)
    n_players = n_blocks if players is None else len(players)
    jobs = coalition_jobs(make_estimator(n_blocks=n_players, **_estimator_args(estimator)))
    if job not in jobs:
        raise ValueError(f"job {job!r} is not one of this estimator's jobs: {', '.join(jobs)}")
    records_store = CoalitionStore(store, n_players, spec)
    wanted = jobs[job]
    stats = _play(
        records_store,
        job,
        wanted,
        lambda: _coalition_evaluator(model, runtime, spec, ids, masks, n_blocks, players),
    )
    forwards = sum(s.block_forwards for s in stats)
    naive = sum(s.naive_block_forwards for s in stats)
    seconds = sum(s.seconds for s in stats)
    if stats:
        log.info(
            "%s: %d block forwards (naive evaluator: %d, %.2fx fewer) in %.1f s",
            job,
            forwards,
            naive,
            naive / max(forwards, 1),
            seconds,
        )
    records = records_store.records()
    summary = {
        "job": job,
        "coalitions": len(wanted),
        "evaluated": sum(s.coalitions for s in stats),
        "block_forwards": forwards,
        "naive_block_forwards": naive,
        "seconds": seconds,
    }
    attrs = {
        "spec": _json(spec),
        "estimator": _json(estimator),
        "job": job,
        "evaluation": _json(summary),
    }
    if players is not None:
        attrs["players"] = _json([player.to_dict() for player in players])
    write_records(out, {m: records[m] for m in wanted}, n_players, attrs)
    return summary


def _play(store, job: str, wanted: list[int], make_evaluator) -> list:
    """Evaluate the coalitions ``wanted`` that ``store`` does not hold, journalled under tag
    ``job``: claimed first, so a coalition another running job claimed is waited for (and taken
    over if that job dies); the evaluator is made only once there is work for it. Returns each
    evaluation's ``EvaluationStats``."""
    from svnup.store import CoalitionRecord

    evaluator, stats = None, []
    with store.writer(job, claim=wanted) as writer:
        todo = writer.claimed
        recorded = len(set(wanted) & set(store.records()))
        log.info(
            "%s: %d coalitions, %d already in the store, %d claimed by other running jobs",
            job,
            len(wanted),
            recorded,
            len(wanted) - recorded - len(todo),
        )

        def record(mask: int, nll: float, tokens: int, seconds: float) -> None:
            writer.append(mask, CoalitionRecord(nll, tokens, seconds))

        while True:
            if todo:
                if evaluator is None:
                    evaluator = make_evaluator()
                stats.append(evaluator.evaluate(todo, record))
            todo = writer.take_over(wanted)  # waits for the coalitions other jobs claimed
            if not todo:
                break
            log.info("%s: took over %d coalitions from a job that died", job, len(todo))
    return stats


def type_game(
    spec: dict,
    runtime: dict,
    model: dict,
    calibration: Path,
    masks: Path,
    store: Path,
    out: Path,
) -> dict:
    """The type game at one probe level: the mean NLL that pruning each linear-layer type
    (q_proj, ..., down_proj) in every block at once adds to the dense model's, one coalition
    a type over ``layers`` players (``svnup.players.type_masks``). Why: a per-linear game
    measures each layer's damage below the noise of the game's tokens; a type's damage summed
    over every block is as many times larger, for one coalition a type. Its coalitions are
    journalled in the store of a ``layers`` game at the same probe, so a killed job resumes."""
    from svnup.calibration import load_statistics
    from svnup.players import type_masks
    from svnup.store import CoalitionStore

    if spec.get("players") != "layers" or spec["ablation"] != "prune":
        raise ValueError(
            "the type game plays 'layers' players with ablation 'prune'; pass the store spec "
            "of such a game (the workflow's type_game rule does)"
        )
    ids, _, meta = load_statistics(calibration)
    players = _game_players(spec, model, masks)
    attention = _family(model).attention
    by_type = type_masks(players)
    wanted = [0, *by_type.values()]
    records_store = CoalitionStore(store, len(players), spec)
    stats = _play(
        records_store,
        "types",
        wanted,
        lambda: _coalition_evaluator(model, runtime, spec, ids, masks, meta["n_blocks"], players),
    )
    records = records_store.records()
    nll = {mask: records[mask].nll_sum / records[mask].n_tokens for mask in wanted}
    layer_params: list[dict[str, int]] = [{} for _ in range(meta["n_blocks"])]
    for player in players:
        layer_params[player.block][player.layers[0]] = player.params
    result = {
        "spec": spec,
        "types": list(by_type),
        "damage": [nll[mask] - nll[0] for mask in by_type.values()],
        "dense_nll": nll[0],
        "layer_params": layer_params,
        "attention": attention,  # the halves of svnup-types
        "coalitions": len(wanted),
        "evaluated": sum(s.coalitions for s in stats),
        "seconds": sum(records[mask].seconds for mask in wanted),
        "versions": versions(),
    }
    log.info(
        "type damage: %s",
        ", ".join(f"{t} {d:.4f}" for t, d in zip(result["types"], result["damage"], strict=True)),
    )
    write_json(out, result)
    return result


def _game_players(spec: dict, model: dict, masks: Path | None):
    """The players of a game that does not play whole blocks (None when it does): their layers
    and weight counts from the probe file, their halves from the model family."""
    from svnup.calibration import probe_shapes
    from svnup.players import make_players

    kind = spec.get("players", "blocks")
    if kind == "blocks":
        return None
    if masks is None:
        raise ValueError(f"players {kind!r} need the probe file (--masks; ablation: prune)")
    return make_players(kind, probe_shapes(masks), _family(model).attention)


def _family(model: dict):
    """The model's family (``svnup.families.FAMILIES``), from its config alone."""
    from transformers import AutoConfig

    from svnup.families import family_of

    config = AutoConfig.from_pretrained(model["path"], revision=model.get("revision"))
    return family_of(config.model_type)


def _coalition_evaluator(model, runtime, spec, ids, masks, n_blocks, players):
    """The model, loaded once a job has coalitions to evaluate, and the probe file, from which
    the evaluator reads a block's probe when a coalition first ablates it."""
    from svnup.calibration import ProbeFile
    from svnup.evaluator import CoalitionEvaluator

    engine, _ = _load(model, runtime, with_tokenizer=False)
    if engine.n_blocks != n_blocks:
        raise ValueError(f"model has {engine.n_blocks} blocks, calibration recorded {n_blocks}")
    probes = ProbeFile(masks) if spec["ablation"] == "prune" else None
    return CoalitionEvaluator(
        engine,
        ids[: spec["eval_samples"]],
        ablation=spec["ablation"],
        probes=probes,
        targets=spec.get("targets", "text"),
        players=players,
    )


def _estimator_args(estimator: dict) -> dict:
    args = dict(estimator)
    return {"name": args.pop("estimator"), **args}


VALUE_TRANSFORMS = {
    "neg_nll": lambda nll_sum, n_tokens: -nll_sum / n_tokens,
    "neg_ppl": lambda nll_sum, n_tokens: -float(np.exp(nll_sum / n_tokens)),
}


def shapley(spec: dict, jobs: list[Path], out: Path, csv: Path) -> None:
    """Per-block values from the coalition records of every job, with their uncertainty."""
    import pandas as pd

    from svnup.shapley import make_estimator
    from svnup.store import read_records

    if not jobs:
        raise ValueError("no coalition job files given (--jobs); name the files to aggregate")
    records, n_blocks, players = {}, None, None
    for path in jobs:
        job_records, attrs = read_records(path)
        records.update(job_records)
        n_blocks = int(attrs["n_blocks"])  # the game's players
        if "players" in attrs:
            players = json.loads(attrs["players"])
    transform = VALUE_TRANSFORMS[spec["value"]]
    estimator = make_estimator(n_blocks=n_blocks, **_estimator_args(_estimator_part(spec)))

    def value(mask: int) -> float:
        if mask not in records:
            raise ValueError(f"coalition {mask:#x} is missing from the coalition jobs")
        r = records[mask]
        return transform(r.nll_sum, r.n_tokens)

    result = estimator.estimate(value)
    stderr = result.stderr if result.stderr is not None else np.full(n_blocks, np.nan)
    seconds = sum(records[m].seconds for m in estimator.coalitions())
    write_scores(
        out,
        result.values,
        stderr,
        source="shapley",
        spec=spec,
        n_coalitions=result.n_coalitions,
        seconds=seconds,
        versions=versions(),
        **({} if players is None else {"players": players}),
    )
    columns = {"block": range(n_blocks)}
    if players is not None:
        columns = {"player": [p["name"] for p in players], "block": [p["block"] for p in players]}
    table = pd.DataFrame({**columns, "shapley": result.values, "stderr": stderr})
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)


def _estimator_part(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("store", "value")}


def _json(data) -> str:
    return json.dumps(data, sort_keys=True)


def curve(spec: dict, scores: list[Path], out: Path, type_games: list[Path] | None = None) -> None:
    """One [level, block] table from the Shapley values measured at each probe sparsity; with
    ``spec["type_games"]`` (``split: types``) also the type games' [level, type] damage table,
    from ``type_games`` (one file a level, in the levels' order), which the budget splits
    players by. A spec without Shapley games (svnup-types) reads no scores: its file holds the
    type table and the players (``spec["unit"]``) that the budget keeps at the target."""
    games = spec.get("shapley", [])
    if len(scores) != len(games):
        raise ValueError(
            f"got {len(scores)} score files for levels {spec['levels']}"
            + ("" if games else " of a curve of type games alone, which reads none")
        )
    rows = [read_scores(path) for path in scores]
    players = rows[0][2].get("players") if rows else None
    if any(meta.get("players") != players for _, _, meta in rows):
        raise ValueError("the score files were measured with different players")
    extra = {} if players is None else {"players": players}
    if spec.get("type_games"):
        extra["type_game"] = _type_table(spec, type_games or [])
    elif type_games:
        raise ValueError("type game files given (--type-games) for a curve without split: types")
    if not games:
        if "type_game" not in extra:
            raise ValueError("a curve without Shapley games needs type games (spec type_games)")
        extra["players"] = _units(spec["unit"], extra["type_game"], type_games[0])
    type_games_played = extra.get("type_game", {}).get("games", [])
    write_scores(
        out,
        [values for values, _, _ in rows] if games else None,
        [stderr for _, stderr, _ in rows] if games else None,
        source="levels" if games else "types",
        levels=spec["levels"],
        spec=spec,
        n_coalitions=sum(meta.get("n_coalitions") or 0 for _, _, meta in rows)
        + sum(game["coalitions"] for game in type_games_played),
        seconds=sum(meta.get("seconds") or 0.0 for _, _, meta in rows)
        + sum(game["seconds"] for game in type_games_played),
        versions=versions(),
        **extra,
    )


def _units(unit: str, table: dict, path: Path) -> list[dict]:
    """The players svnup-types keeps at the target (``svnup.players.make_players``), from the
    type game's layers and attention module."""
    from svnup.players import make_players

    if "attention" not in table:
        raise ValueError(
            f"{path} names no attention module (a type game of an older svnup); delete it and "
            "re-run: its coalitions stay in the store, so none is evaluated again"
        )
    counts = [{name: (n,) for name, n in block.items()} for block in table["layer_params"]]
    return [player.to_dict() for player in make_players(unit, counts, table["attention"])]


def _type_table(spec: dict, paths: list[Path]) -> dict:
    """The type games of a curve's levels as one table: types, [level, type] damage, and each
    block's {layer: weights}; every file must be the game its spec names, on the same layers."""
    from svnup.config import key

    if len(paths) != len(spec["type_games"]):
        raise ValueError(
            f"got {len(paths)} type game files (--type-games) for levels {spec['levels']}; "
            "give one a level, in their order"
        )
    games = [read_json(path) for path in paths]
    for path, game, expected in zip(paths, games, spec["type_games"], strict=True):
        if key(game.get("spec", {})) != expected:
            raise ValueError(
                f"{path} is not the type game of this curve (store key {expected}); pass the "
                "files the workflow builds for its levels, in their order"
            )
        if (game["types"], game["layer_params"]) != (games[0]["types"], games[0]["layer_params"]):
            raise corrupt(path, "its layer types differ from those of the first level's game")
    table = {
        "types": games[0]["types"],
        "damage": [game["damage"] for game in games],
        "layer_params": games[0]["layer_params"],
        "games": [{k: game[k] for k in ("coalitions", "seconds", "dense_nll")} for game in games],
    }
    if "attention" in games[0]:
        table["attention"] = games[0]["attention"]
    return table


def metric(spec: dict, runtime: dict, model: dict, calibration: Path | None, out: Path) -> None:
    """A metric of the dense model (``svnup.registry.METRICS``) for every block, or every linear
    layer, from its weights and, where the metric needs them, the dense calibration statistics:
    the recorded column norms, or Hessians from one pass of the calibration tokens through the
    dense blocks."""
    from tqdm.auto import tqdm

    from svnup.calibration import block_statistics, load_statistics
    from svnup.models import linear_layers
    from svnup.players import make_players
    from svnup.registry import METRICS, choices, resolve

    name = spec["metric"]
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {choices(METRICS)}")
    entry = METRICS[name]
    if entry.statistics and calibration is None:
        raise ValueError(f"metric {name!r} needs --calibration (dense input statistics)")
    function = resolve(entry.function)
    params = {k: v for k, v in spec.items() if k not in ("metric", "calibration", "model")}
    ids, stats = None, None
    if entry.statistics:
        ids, stats, _ = load_statistics(calibration)
    engine, _ = _load(model, runtime, with_tokenizer=False)
    start = time.perf_counter()
    if entry.statistics == "hessian":
        hidden, kwargs = engine.embed(ids)
    scores = []
    for index, block in enumerate(tqdm(engine.blocks, desc=name)):
        with engine.on_device(block):
            layers = linear_layers(block)
            if entry.statistics == "hessian":
                inputs, hidden = block_statistics(engine, index, hidden, kwargs, hessian=True)
                statistic = {layer_name: s.pop_hessian() for layer_name, s in inputs.items()}
            else:
                statistic = stats[index] if stats else dict.fromkeys(layers)
            scores.append(
                function(
                    {n: (layer.weight.data, statistic[n]) for n, layer in layers.items()},
                    **params,
                )
            )
    meta = {"source": f"metric:{name}", "spec": spec, "versions": versions()}
    if isinstance(scores[0], dict):  # one score per linear layer: each layer is a player
        shapes = [
            {n: tuple(layer.weight.shape) for n, layer in linear_layers(block).items()}
            for block in engine.blocks
        ]
        players = make_players("layers", shapes, engine.family.attention)
        scores = [scores[p.block][p.layers[0]] for p in players]
        meta["players"] = [p.to_dict() for p in players]
    write_scores(out, scores, seconds=time.perf_counter() - start, **meta)


def search(
    spec: dict,
    runtime: dict,
    model: dict,
    sparsity: float,
    calibration: Path,
    out: Path,
    database: Path | None = None,
    start: Path | None = None,
) -> None:
    """A search over allocations for one target and pruner: ATP's common difference over depth,
    or EvoPress's per-linear levels (from the level ``database`` of the levels stage), from
    uniform or from the ``start`` budget its spec names."""
    if spec["search"] == "evopress":
        if database is None:
            raise ValueError("evopress searches a level database: pass --database (stage levels)")
        if "start_budget" in spec and start is None:
            raise ValueError(
                f"this search starts from {spec['start']}'s allocation: pass --start (its budget)"
            )
        _evopress_search(spec, runtime, model, sparsity, calibration, database, Path(out), start)
    else:
        _atp_search(spec, runtime, model, sparsity, calibration, Path(out))


def _atp_search(
    spec: dict, runtime: dict, model: dict, sparsity: float, calibration: Path, out: Path
) -> None:
    """ATP's search: the common difference beta of per-block sparsities S + beta * (b - (L-1)/2)
    with the lowest calibration loss after pruning with the run's pruner, on the reference's grid
    beta = step, 2 * step, ... up to the largest beta that keeps every block in [0, 1].

    The reference scans the grid and picks by WikiText-2 test perplexity. svnup picks by the NLL
    of the calibration sequences, so the test set never chooses a hyper-parameter, and by default
    searches the grid by golden section (the loss falls, then rises with beta: O(log n) prunes
    instead of n); ``strategy: grid`` scans it all. Each candidate is the allocation the budget
    stage would make of it (within the allocation bounds) and is journalled, so a killed search
    resumes.
    """
    from svnup.allocation import allocate, atp_grid, unimodal_argmin
    from svnup.calibration import load_statistics
    from svnup.pruning import prune_and_score

    ids, _, meta = load_statistics(calibration)
    n_blocks, params = meta["n_blocks"], np.asarray(meta["block_params"], dtype=np.float64)
    grid = atp_grid(n_blocks, sparsity, spec["step"])
    depth = np.arange(n_blocks) - (n_blocks - 1) / 2
    journal = JsonLines(Path(out).with_suffix(".journal"))
    done = {row["beta"]: row for row in journal.rows()}
    state: dict = {}

    def loss(index: int) -> float:
        beta = grid[index]
        if beta not in done:
            if not state:
                state["engine"], _ = _load(model, runtime, with_tokenizer=False)
                state["dense"] = _linear_weights(state["engine"])
            sparsities = allocate(
                spec["search"], beta * depth, params, sparsity, (spec["min"], spec["max"])
            )
            start = time.perf_counter()
            nll = prune_and_score(state["engine"], ids, sparsities.tolist(), spec["pruner"])
            _restore_linear_weights(state["engine"], state["dense"])
            done[beta] = {"beta": beta, "nll": nll, "seconds": time.perf_counter() - start}
            journal.append(done[beta])
            log.info("%s beta %.4f: calibration NLL %.5f", spec["search"], beta, nll)
        return done[beta]["nll"]

    if spec["strategy"] == "grid":
        best = min(range(len(grid)), key=loss)
    else:
        best = unimodal_argmin(loss, len(grid))
    candidates = [done[beta] for beta in grid if beta in done]
    write_scores(
        out,
        grid[best] * depth,
        source=f"search:{spec['search']}",
        spec=spec,
        target=sparsity,
        beta=grid[best],
        grid=grid,
        candidates=candidates,
        seconds=sum(c["seconds"] for c in candidates),
        versions=versions(),
    )
    journal.remove()


def levels(spec: dict, runtime: dict, model: dict, sparsity: float, calibration: Path, out: Path):
    """EvoPress's level database for one target: every linear layer pruned at each level around
    it (``svnup.evopress``), from the dense model's inputs, with the pruner ``spec`` names."""
    from svnup.calibration import load_statistics
    from svnup.evopress import (
        Unit,
        check_movable,
        database_weights,
        level_range,
        save_database,
        weights_per_step,
    )
    from svnup.models import linear_layers

    ids, stats, _ = load_statistics(calibration)
    engine, _ = _load(model, runtime, with_tokenizer=False)
    shapes = [
        (index, name, tuple(layer.weight.shape))
        for index, block in enumerate(engine.blocks)
        for name, layer in linear_layers(block).items()
    ]
    step = weights_per_step(spec["weights_diff"], [rows * cols for _, _, (rows, cols) in shapes])
    check_movable(  # before any pruning
        [
            Unit(b, n, shape, *level_range(sparsity, shape[0] * shape[1], step, spec["num_levels"]))
            for b, n, shape in shapes
        ]
    )
    start = time.perf_counter()
    units = database_weights(engine, ids, stats, spec["pruner"], sparsity, step, spec["num_levels"])
    meta = {"spec": spec, "target": sparsity, "step": step, "dtype": str(engine.dtype)}
    save_database(out, units, {**meta, "versions": versions()})
    log.info(
        "levels %s at %g: %d linear layers, %d weights a step, %.1f s",
        spec["pruner"],
        sparsity,
        len(shapes),
        step,
        time.perf_counter() - start,
    )


def _evopress_search(
    spec: dict,
    runtime: dict,
    model: dict,
    sparsity: float,
    calibration: Path,
    database: Path,
    out: Path,
    start: Path | None = None,
) -> None:
    """EvoPress's evolutionary search (``svnup.evopress``) over the levels of ``database``, each
    generation journalled, so a killed search resumes after its last finished generation. It
    starts from uniform, or from the ``start`` budget's per-layer sparsities at their nearest
    levels with the exact total, and with ``patience`` stops early on a plateau. The scores
    are each linear layer's sparsity offset from the target (a player per layer)."""
    from svnup.calibration import load_statistics
    from svnup.evopress import (
        LevelDatabase,
        LevelScorer,
        check_movable,
        generation,
        generation_rng,
        nearest_levels,
        plateaued,
        within_bounds,
    )
    from svnup.players import Player

    ids, _, _ = load_statistics(calibration)
    n_rows, seqlen = ids.shape
    if len(spec["survivors"]) != len(spec["tokens"]):
        raise ValueError(
            f"allocation.evopress: {len(spec['survivors'])} selection steps in survivors but "
            f"{len(spec['tokens'])} in tokens; give one token count per step"
        )
    if max(spec["tokens"]) > n_rows * seqlen:
        raise ValueError(
            f"allocation.evopress.tokens {max(spec['tokens'])} exceeds the {n_rows} x {seqlen} "
            "calibration tokens; lower it or raise calibration.nsamples"
        )
    journal = JsonLines(out.with_suffix(".journal"))
    history = journal.rows()
    if not history:
        history = _shorter_search(out, spec)
        for row in history:
            journal.append(row)
    db = LevelDatabase(database)
    try:
        step = db.meta["step"]
        if db.meta["target"] != sparsity:
            raise ValueError(f"{database} holds levels around {db.meta['target']}, not {sparsity}")
        bounds = (spec["min"], spec["max"])
        units = [within_bounds(unit, sparsity, step, bounds) for unit in db.units]
        check_movable(units)
        first = [0] * len(units)
        if "start_budget" in spec:
            sparsities = _start_sparsities(start, spec["start_budget"], sparsity, units)
            first = nearest_levels(units, sparsities, sparsity, step)
        parent = history[-1]["parent"] if history else first
        if history:
            log.info("evopress: resuming after generation %d", len(history))
        scorer = None
        patience, tolerance = spec.get("patience"), spec.get("tolerance", 0.0)
        for index in range(len(history), spec["generations"]):
            if plateaued([row["fitness"] for row in history], patience, tolerance):
                break
            if scorer is None:
                engine, _ = _load(model, runtime, with_tokenizer=False)
                scorer = LevelScorer(engine, ids, db, units, spec["fitness"])
            began, before = time.perf_counter(), scorer.evaluations
            scorer.base = parent  # every candidate is a few switches of it: prefix sharing
            parent, fitness = generation(
                parent,
                units,
                generation_rng(spec["seed"], index),
                scorer,
                spec["offspring"],
                spec["survivors"],
                spec["tokens"],
                n_rows,
                seqlen,
            )
            row = {
                "generation": index,
                "parent": parent,
                "fitness": fitness,
                "evaluations": scorer.evaluations - before,
                "seconds": time.perf_counter() - began,
            }
            journal.append(row)
            history.append(row)
            log.info(
                "evopress generation %d/%d: %s %.6g (%d candidates scored, %.1f s)",
                index + 1,
                spec["generations"],
                spec["fitness"],
                fitness,
                row["evaluations"],
                row["seconds"],
            )
    finally:
        db.close()
    players = [Player(u.block, (u.name,), u.numel, f"{u.block}.{u.name}") for u in units]
    write_scores(
        out,
        [level * step / unit.numel for level, unit in zip(parent, units, strict=True)],
        source="search:evopress",
        spec=spec,
        target=sparsity,
        step=step,
        chosen_levels=parent,
        start_levels=first,
        players=[player.to_dict() for player in players],
        generations_run=len(history),
        stopped="plateau" if len(history) < spec["generations"] else "generations",
        history=[{k: v for k, v in row.items() if k != "parent"} for row in history],
        seconds=sum(row["seconds"] for row in history),
        versions=versions(),
    )
    journal.remove()


def _shorter_search(out: Path, spec: dict) -> list[dict]:
    """The generations of the longest finished search beside ``out`` (same model and target, a
    sibling key folder) whose spec differs from ``spec`` only by fewer generations, each with its
    parent where the search needs it. A longer search repeats those generations exactly (each draws
    its random numbers from (seed, generation)), so raising ``generations`` continues a finished
    search instead of starting over."""
    same = {k: v for k, v in spec.items() if k != "generations"}
    best: list[dict] = []
    source = None
    for path in sorted(out.parent.parent.glob(f"*/{out.name}")):
        if path == out:
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue  # a damaged neighbour is not this search's business
        other, history = data.get("spec", {}), data.get("history", [])
        if (
            {k: v for k, v in other.items() if k != "generations"} == same
            and len(history) == other.get("generations") < spec["generations"]
            and len(history) > len(best)
        ):
            best, source = [dict(row) for row in history], path
            best[-1]["parent"] = data["chosen_levels"]
    if source is not None:
        log.info("evopress: continuing the %d generations of %s", len(best), source)
    return best


def _start_sparsities(path: Path | None, budget_key: str, target: float, units) -> list[float]:
    """Each unit's sparsity in the budget a search starts from: its linear layer's, or where the
    budget's players are blocks, its block's."""
    from svnup.config import key

    plan = read_json(path)
    if key(plan["spec"]) != budget_key or plan["target"] != target:
        raise ValueError(
            f"{path} is not the budget this search starts from (key {budget_key}, target "
            f"{target}); pass the one the workflow builds for it"
        )
    layers = plan.get("layer_sparsities")
    try:
        if layers is None:
            return [float(plan["sparsities"][u.block]) for u in units]
        return [float(layers[u.block][u.name]) for u in units]
    except (IndexError, KeyError):
        raise corrupt(path, "its sparsities do not name every linear layer of the model") from None


def _linear_weights(engine) -> list[dict]:
    """A CPU copy of every block's linear weights, to undo pruning in place."""
    from svnup.models import linear_layers

    return [
        {name: layer.weight.data.to("cpu", copy=True) for name, layer in linear_layers(b).items()}
        for b in engine.blocks
    ]


def _restore_linear_weights(engine, weights: list[dict]) -> None:
    from svnup.models import linear_layers

    for block, saved in zip(engine.blocks, weights, strict=True):
        for name, layer in linear_layers(block).items():
            layer.weight.data.copy_(saved[name])


def budget(spec: dict, sparsity: float, calibration: Path, scores: Path | None, out: Path) -> None:
    """Per-block sparsities for one target: the allocation, with the weighted mean exactly on it.

    The parameter counts that weight the mean come from the calibration record, so this stage
    never loads the model. Scores measured per player smaller than a block (``svnup.players``)
    are allocated per player: the budget then also holds each player's sparsity and each
    block's per-layer sparsities, which the prune stage applies; ``sparsities`` stays one per
    block (the weighted mean of its players) for everything that reads blocks.
    """
    from svnup.allocation import allocate
    from svnup.players import block_sparsities, layer_sparsities, players_from_json
    from svnup.registry import ALLOCATIONS

    with open_h5(calibration, "r") as f:
        meta = read_meta(f, calibration)
    block_params = np.asarray(meta["block_params"], dtype=np.float64)
    method = spec["method"]
    values, stderr, meta = (None, None, {}) if scores is None else read_scores(scores)
    players = players_from_json(meta["players"]) if meta.get("players") else None
    params = block_params if players is None else np.array([p.params for p in players], float)
    if values is not None:
        _check_scores(scores, values, len(params))
    if players is not None and params.sum() != block_params.sum():
        raise ValueError(
            f"the players of {scores} hold {params.sum():.0f} weights, the calibration's blocks "
            f"{block_params.sum():.0f}; the scores belong to another model"
        )
    sparsities = allocate(
        method,
        None if values is None else np.asarray(values, dtype=np.float64),
        params,
        sparsity,
        (spec["min"], spec["max"]),
        levels=meta.get("levels") if values is not None else None,
        **{name: spec[name] for name in ALLOCATIONS[method].mapping_params},
    )
    achieved = float(np.dot(sparsities, params) / params.sum())
    plan = {
        "spec": spec,
        "target": sparsity,
        "achieved": achieved,
        "sparsities": sparsities.tolist(),
        "block_params": block_params.astype(int).tolist(),
        "importance": values,
        "importance_stderr": stderr,
        "scores": {k: meta.get(k) for k in ("source", "n_coalitions", "seconds")},
    }
    if players is not None:
        n_blocks = len(block_params)
        plan["sparsities"] = block_sparsities(players, sparsities, n_blocks)
        plan["players"] = [player.to_dict() for player in players]
        plan["player_sparsities"] = sparsities.tolist()
        plan["layer_sparsities"] = layer_sparsities(players, sparsities, n_blocks)
    if meta.get("type_game"):
        # the curves' floor: svnup-fit's mapping reads it too, svnup-types' scores carry it
        floor = spec["floor"] if "floor" in spec else meta["spec"]["floor"]
        plan |= _split_by_type(meta, players, sparsities, spec, block_params, floor)
    write_json(out, plan)


def _split_by_type(
    meta: dict, players, sparsities: np.ndarray, spec: dict, block_params, floor: float
) -> dict:
    """The budget's per-layer sparsities with every player split between its layers by the type
    game's curves (``split: types``), and the curves; whole blocks are players of all their
    layers here. Each player keeps its sparsity as the weighted mean of its layers'."""
    from svnup.allocation import type_curves
    from svnup.players import Player, type_layer_sparsities

    game = meta["type_game"]
    layer_params = game["layer_params"]
    if [sum(block.values()) for block in layer_params] != [int(p) for p in block_params]:
        raise ValueError(
            "the type game's layers do not hold the calibration's block weights; the type game "
            "belongs to another model"
        )
    if players is None:
        players = [
            Player(b, tuple(layers), sum(layers.values()), str(b))
            for b, layers in enumerate(layer_params)
        ]
    curvatures, scales = type_curves(game["damage"], meta["levels"], floor)
    curves = dict(zip(game["types"], zip(curvatures, scales, strict=True), strict=True))
    layers = type_layer_sparsities(
        players, sparsities, layer_params, curves, (spec["min"], spec["max"])
    )
    fit = {t: {"curvature": float(c), "scale": float(a)} for t, (c, a) in curves.items()}
    return {"layer_sparsities": layers, "layer_params": layer_params, "type_curves": fit}


def _check_scores(path: Path, values, n_players: int) -> None:
    """Scores are finite numbers, one per player (per level and player for a damage curve): a
    file edited by hand or damaged is named, not met as a failed conversion in the allocation."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise corrupt(path, "its values are not a table of numbers") from None
    if array.ndim not in (1, 2) or not np.isfinite(array).all():
        raise corrupt(path, "its values are not all finite numbers")
    if array.shape[-1] != n_players:
        raise corrupt(path, f"{array.shape[-1]} values for the {n_players} players of the model")


def prune(
    spec: dict,
    runtime: dict,
    model: dict,
    budget: Path,
    calibration: Path,
    out_dir: Path,
    report: Path,
    layers_only: bool = False,
) -> None:
    """Prune with the budget's per-block sparsities and save a Hugging Face checkpoint, with its
    provenance (its identity: svnup.provenance) and an llm-compressor recipe of the allocation
    beside it (svnup.export). ``spec["nm"]``, where set, prunes N of each M weights of a row.

    ``layers_only`` saves only the pruned linear layers (``svnup.pruning.pruned_layers``) in
    place of the checkpoint's weights: what a run keeps until it is evaluated, which the stages
    load onto the dense model. It takes a fraction of the disk of a checkpoint (a sixteenth of
    bfloat16 weights for Wanda's masks)."""
    from svnup.calibration import load_statistics, save_probe
    from svnup.content import PRUNED_LAYERS
    from svnup.export import block_names, describe_checkpoint
    from svnup.provenance import checkpoint_identity, read_budget
    from svnup.pruning import prune_model, pruned_layers

    plan = read_budget(budget, target=spec["sparsity"], spec_key=spec["budget"])
    identity = checkpoint_identity(spec, model, budget, calibration)
    engine, tokenizer = _load(model, runtime, with_tokenizer=not layers_only)
    ids, _, calibration_meta = load_statistics(calibration)
    start = time.perf_counter()
    reports = prune_model(
        engine,
        ids,
        plan["sparsities"],
        method=spec["pruner"],
        nm=spec.get("nm"),
        layer_sparsities=plan.get("layer_sparsities"),
    )
    seconds = time.perf_counter() - start
    with atomic_path(out_dir) as tmp:
        if layers_only:
            tmp.mkdir()
            layers = pruned_layers(engine, spec["pruner"])
            save_probe(tmp / PRUNED_LAYERS, layers, {"model": model, "versions": versions()})
        else:
            engine.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        describe_checkpoint(
            tmp,
            plan=plan,
            prune_spec=spec,
            model=model,
            calibration_spec=calibration_meta["spec"],
            blocks=block_names(engine.family.blocks, engine.n_blocks),
            measured=[r.sparsity for r in reports],
            identity=identity,
            versions=versions(),
        )
    write_json(
        report,
        {
            "spec": spec,
            **identity,
            "seconds": seconds,
            "blocks": [r.to_dict() for r in reports],
            "versions": versions(),
        },
    )


def recipe(budget: Path, pruner: str, model: dict, out: Path, nm: str | None = None) -> None:
    """The llm-compressor recipe of one allocation, from its budget alone (nothing is pruned);
    ``nm`` ("2:4") asks for N:M masks."""
    from svnup import export
    from svnup.kernels import parse_nm
    from svnup.provenance import read_budget

    plan = read_budget(budget)
    nm = None if nm is None else "{}:{}".format(*parse_nm(nm))
    blocks = export.block_names(_family(model).blocks, len(plan["sparsities"]))
    export.write_recipe(
        out,
        export.recipe(pruner, *export.recipe_targets(plan, blocks), nm),
        export.recipe_header(plan, pruner, model["path"], __version__),
    )


def evaluate(spec: dict, runtime: dict, model: dict, model_dir: str, out: Path) -> None:
    """Perplexity of a (pruned or dense) checkpoint on one dataset, with its protocol (how the
    rows are joined: ``spec["protocol"]``, else guessed from the dataset's name) and the identity
    of the checkpoint it was measured on."""
    from svnup.data import check_source, resolve_protocol
    from svnup.perplexity import dataset_perplexity
    from svnup.provenance import read_identity
    from svnup.specs import check_context

    check_source(spec["dataset"], spec["split"])  # before the model loads
    protocol = resolve_protocol(spec["dataset"], spec.get("protocol"))
    _check_checkpoint(model_dir)
    pruned_layers = _pruned_layers_file(model_dir) is not None  # the dense model's context
    check_context(model, spec["seqlen"], path=None if pruned_layers else str(model_dir))
    identity = read_identity(model_dir, model)
    engine, tokenizer = _load(model, runtime, path=model_dir)
    result = dataset_perplexity(
        engine,
        tokenizer,
        spec["dataset"],
        split=spec["split"],
        seqlen=spec["seqlen"],
        windows=spec.get("windows"),
        protocol=protocol,
    )
    log.info("%s: ppl %.4f over %d windows", spec["dataset"], result.ppl, result.windows)
    write_json(
        out,
        {
            "spec": spec,
            **result.to_dict(),
            "protocol": protocol,
            "checkpoint_id": identity,
            "versions": versions(),
        },
    )


def _check_checkpoint(model_dir: str | Path) -> None:
    """A pruned checkpoint that this workflow wrote must be there (or show up soon)."""
    from svnup.config import is_workflow_path

    if is_workflow_path(str(model_dir)) and not _appears(Path(model_dir), seconds=60):
        raise FileNotFoundError(
            f"pruned checkpoint {model_dir} is gone (with save_model: false it is removed once "
            "its run is collected); ask for the run's ppl.json, which prunes it again"
        )


def _appears(path: Path, seconds: float) -> bool:
    """Whether ``path`` exists or shows up within ``seconds``: on a shared file system a folder
    written on another node can take a while to be visible here."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def zeroshot(spec: dict, runtime: dict, model: dict, model_dir: str, out: Path) -> None:
    """Zero-shot accuracy of a (pruned or dense) checkpoint on lm-evaluation-harness tasks, with
    the identity of the checkpoint it was measured on.

    The harness runs the whole model on the device (no block offload).
    """
    from svnup.provenance import read_identity
    from svnup.zeroshot import check_harness, task_manager, zero_shot_accuracy

    check_harness()
    manager = task_manager(spec["tasks"], spec["include_path"])  # unknown tasks fail here
    _check_checkpoint(model_dir)
    identity = read_identity(model_dir, model)
    engine, tokenizer = _load(model, {**runtime, "offload": False}, path=model_dir)
    result = zero_shot_accuracy(
        engine.model,
        tokenizer,
        spec["tasks"],
        include_path=spec["include_path"],
        limit=spec["limit"],
        batch_size=runtime.get("batch_size", 8),
        manager=manager,
    )
    log.info("zero-shot mean acc %s over %s", result["mean_acc"], ", ".join(result["tasks"]))
    write_json(out, {"spec": spec, **result, "checkpoint_id": identity, "versions": versions()})


def zeroshot_task(spec: dict, out_dir: Path) -> None:
    """A local multiple-choice task (pick the true continuation of a passage) built from a text
    source, for zero-shot evaluation without downloads (svnup.zeroshot.continuation_docs)."""
    from svnup.data import load_texts
    from svnup.zeroshot import continuation_docs, write_choice_task

    texts = load_texts(spec["source"], spec["split"])
    docs = continuation_docs(
        texts,
        spec["n_docs"],
        spec["n_choices"],
        spec["seed"],
        spec["context_sentences"],
        spec["max_sentence_bytes"],
    )
    with atomic_path(out_dir) as tmp:
        write_choice_task(tmp, spec["name"], docs, final_folder=out_dir)


def collect(
    name: str,
    sparsity: float | None,
    allocation: str | None,
    pruner: str | None,
    evaluations: list[Path],
    out: Path,
    budget: Path | None = None,
    report: Path | None = None,
    zero_shot: Path | None = None,
    checkpoint: Path | None = None,
    model: dict | None = None,
) -> None:
    """One ppl.json with every number of a run: perplexities, protocol, budget, timings, the
    zero-shot accuracies where they were asked for, and the pruned checkpoint when it is kept.

    Every number must belong to one checkpoint (svnup.provenance): the budget must be the one
    the prune report was made from, and each evaluation measured on the checkpoint that report
    describes (a dense run's: the dense ``model``'s); else nothing is written.
    """
    from svnup.provenance import check_measured_on, dense_identity, pruned_identity, read_budget

    plan = None if budget is None else read_budget(budget, target=sparsity)
    if report is not None:
        if budget is None:
            raise ValueError("a prune report needs its --budget, to check it was made from it")
        identity, described_by = pruned_identity(report, budget), str(report)
    elif model is not None:
        identity, described_by = dense_identity(model), f"the dense model {model['path']}"
    else:
        raise ValueError("collect needs --report and --budget (a pruned run) or --model (dense)")
    measured = {Path(p): read_json(p) for p in [*evaluations, *([zero_shot] if zero_shot else [])]}
    check_measured_on(identity, measured, described_by)
    results = [measured[Path(p)] for p in evaluations]
    data = {
        "model": name,
        "target_sparsity": sparsity,
        "allocation": allocation,
        "pruner": pruner,
        "perplexity": {r["dataset"]: r["ppl"] for r in results},
        "evaluations": {r["dataset"]: r for r in results},
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_id": identity,
        "versions": versions(),
    }
    if plan is not None:
        keys = ("achieved", "sparsities", "importance", "scores", "spec")
        data["budget"] = {k: plan[k] for k in keys}
        for k in ("players", "player_sparsities", "layer_sparsities", "type_curves"):
            if k in plan:
                data["budget"][k] = plan[k]
    if report is not None:
        pruning = read_json(report)
        data["pruning"] = {
            "seconds": pruning["seconds"],
            "block_sparsity": [b["sparsity"] for b in pruning["blocks"]],
            "blocks": pruning["blocks"],
        }
    if zero_shot is not None:
        data["zero_shot"] = measured[Path(zero_shot)]
    write_json(out, data)


def _check_run(path: Path, run) -> None:
    """A ppl.json's perplexities are positive numbers (null where one overflowed): a value edited
    by hand into text or a negative number would reach the summary as if it were measured."""
    if not isinstance(run, dict):
        raise corrupt(path, f"a JSON {type(run).__name__}, not a run's object")
    for dataset, ppl in (run.get("perplexity") or {}).items():
        number = isinstance(ppl, int | float) and not isinstance(ppl, bool)
        if ppl is not None and not (number and ppl > 0):
            raise corrupt(path, f"its perplexity on {dataset} is {ppl!r}, not a positive number")


def summary(runs: list[Path], out: Path) -> None:
    """One CSV row per run and dataset, from exactly the given ppl.json files (a workflow passes
    the runs of its configured grid, never whatever else lies in the results folder)."""
    import pandas as pd

    if not runs:
        raise ValueError("no ppl.json files given (--runs); name the runs to tabulate")
    rows = []
    for path in runs:
        run = read_json(path)
        _check_run(path, run)
        for dataset, ppl in run["perplexity"].items():
            rows.append(
                {
                    "path": str(path),
                    "allocation": run["allocation"] or "dense",
                    "pruner": run["pruner"] or "none",
                    "sparsity": run["target_sparsity"] or 0.0,
                    "dataset": dataset,
                    "ppl": ppl,
                    "zero_shot_acc": run.get("zero_shot", {}).get("mean_acc"),
                    "pruning_seconds": run.get("pruning", {}).get("seconds"),
                }
            )
    table = pd.DataFrame(rows)
    repeated = table.duplicated(subset=["allocation", "pruner", "sparsity", "dataset"], keep=False)
    if repeated.any():
        raise ValueError(
            "runs given twice for the same allocation, pruner, sparsity and dataset: "
            + ", ".join(sorted(set(table.loc[repeated, "path"])))
        )
    with atomic_path(out) as tmp:
        table.sort_values(["dataset", "pruner", "allocation", "sparsity"]).to_csv(tmp, index=False)


def report(
    results: Path,
    out_dir: Path,
    summary: Path,
    shapley: Path | None,
    budgets: list[Path],
    recommended: str | None = None,
    note: str | None = None,
) -> None:
    """Figures and an HTML page of one model's results."""
    from svnup.report import make_report

    make_report(results, out_dir, summary, shapley, budgets, recommended, note)
