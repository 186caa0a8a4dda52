"""A within-half split from a game of layer types: each type (q, k, v, o, gate, up, down)
pruned at once in every block, at each probe level, from a bench_allocation.py folder's probes.

Why: EvoPress's SparseGPT allocations on smollm2-135m protect v_proj inside every block, which
svnup's half-block players cannot express, and linear-layer players (210 of them) measure each
layer's damage below the noise of the game's tokens. A type's damage summed over 30 blocks is
30x larger, for 7 coalitions a level.

- ``--split shared`` (svnup-fit's damage model, one curvature c): a layer of type t in a half
  whose damage scale is a costs a * r_t * exp(c s); at a fixed half mean the optimum is
  s_t = K + (ln w_t - ln r_t) / c, the same in every block (the half's scale cancels), so the
  split is one offset per type, each half's weighted offsets summing to zero. ``r_t`` and ``c``
  are the damage fit (``svnup.allocation.fit_damage``) of the type game. Writes a
  budget-shaped JSON (``layer_sparsities``: the target plus the offsets, every block) that
  ``allocation_anatomy.py`` reads as a WITHIN profile.
- ``--split per-type``: a curve (c_t, r_t) per type, and each half of the ``--across`` budget
  split where the marginal damages per weight meet. Writes the whole per-linear allocation.
  The workflow's ``allocation.svnup-fit.split: types`` computes this split with the same
  functions (``svnup.allocation.type_curves``, ``svnup.players.type_layer_sparsities``).

Both keep the game's damage table (``type_game``); ``--game`` reads it back instead of playing.

    python benchmarks/type_profile.py --pruner sparsegpt --target 0.5 --out PROFILE.json \\
        --workdir benchmarks/.cache/allocation-smollm2-svnup-fit-halves
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="a bench_allocation.py folder")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pruner", default="sparsegpt", help="the probes' pruner")
    p.add_argument("--target", type=float, required=True, help="the mean the profile moves")
    p.add_argument("--probes", type=Path, default=None, help="default: WORKDIR/probes-kept")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--game", type=Path, help="an earlier --out: its damage table, not played again")
    p.add_argument(
        "--split",
        choices=["shared", "per-type"],
        default="shared",
        help="shared: one curvature, a profile of offsets; per-type: a curve per type, each "
        "half of --across split where the marginal damages per weight meet",
    )
    p.add_argument("--across", type=Path, help="the budget whose halves --split per-type splits")
    args = p.parse_args(argv)
    if args.split == "per-type" and args.across is None:
        p.error("--split per-type needs --across BUDGET")
    args.probes = args.probes or args.workdir / "probes-kept"
    if not (args.workdir / "config.yaml").is_file():
        p.error(f"--workdir {args.workdir}: no config.yaml; run bench_allocation.py there first")
    return args


def kept_probe(args: argparse.Namespace, root: Path, calibration: Path, level: float) -> Path:
    """The probe of ``args.pruner`` at ``level``, kept in ``--probes``: the workflow's own where
    it still has it (the workflow deletes probes once their games are played), else made."""
    import h5py
    import torch

    from svnup.calibration import iter_probe_masks, load_statistics, save_probe, sparsegpt_probe
    from svnup.models import load_model

    kept = args.probes / f"{args.pruner}-{level}.h5"
    if kept.is_file():
        return kept
    args.probes.mkdir(parents=True, exist_ok=True)
    for path in (root / "probe").glob("*/masks.h5"):
        with h5py.File(path, "r") as f:
            spec = json.loads(f.attrs["meta"])["spec"]
        if spec["pruner"] == args.pruner and float(spec["sparsity"]) == level:
            kept.hardlink_to(path)
            return kept
    print(f"making the {args.pruner} probe at {level}", flush=True)
    engine, _ = load_model(
        args.workdir / "models" / args.model, dtype="float32", device="cpu", with_tokenizer=False
    )
    ids, stats, _ = load_statistics(calibration)
    with torch.no_grad():
        if args.pruner == "sparsegpt":
            blocks = sparsegpt_probe(engine, ids, level)
        else:
            blocks = iter_probe_masks(engine, stats, level, args.pruner)
        save_probe(kept, blocks, {"spec": {"pruner": args.pruner, "sparsity": level}})
    return kept


def profile_offsets(
    scales: dict[str, float], curvature: float, params: dict[str, int], attention: str
) -> dict[str, float]:
    """(ln w_t - ln r_t) / c per type, less its half's parameter-weighted mean."""
    raw = {t: (np.log(params[t]) - np.log(scales[t])) / curvature for t in scales}
    out = {}
    for is_attention in (True, False):
        group = [t for t in raw if t.startswith(f"{attention}.") == is_attention]
        mean = sum(raw[t] * params[t] for t in group) / sum(params[t] for t in group)
        out.update({t: float(raw[t] - mean) for t in group})
    return out


def play(args: argparse.Namespace) -> dict:
    """The type game's damage table: the mean NLL each type adds, pruned in every block."""
    import torch

    from svnup.calibration import ProbeFile, load_statistics, probe_shapes
    from svnup.evaluator import CoalitionEvaluator
    from svnup.models import load_model
    from svnup.players import make_players, type_masks

    torch.set_num_threads(1)
    settings = yaml.safe_load((args.workdir / "config.yaml").read_text())
    game = settings["shapley"]
    levels = settings["allocation"]["svnup-fit"]["levels"]
    root = args.workdir / "results" / args.model
    calibration = next((root / "calibration").glob("*/calibration.h5"))
    probes = {level: kept_probe(args, root, calibration, level) for level in levels}
    ids, _, _ = load_statistics(calibration)
    engine, _ = load_model(
        args.workdir / "models" / args.model, dtype="float32", device="cpu", with_tokenizer=False
    )
    shapes = probe_shapes(probes[levels[0]])
    players = make_players("layers", shapes, engine.family.attention)
    masks = type_masks(players)
    params = {name: int(np.prod(shape)) for name, shape in shapes[0].items()}
    if any({n: int(np.prod(s)) for n, s in block.items()} != params for block in shapes):
        raise SystemExit("the blocks' linear layers differ in shape; one profile cannot fit them")

    losses, start = np.zeros((len(levels), len(masks) + 1)), time.perf_counter()
    for k, level in enumerate(levels):
        evaluator = CoalitionEvaluator(
            engine,
            ids[: game["eval_samples"]],
            ablation="prune",
            probes=ProbeFile(probes[level]),
            targets=game.get("targets", "text"),
            players=players,
        )
        order = [0, *masks.values()]

        def record(mask: int, nll: float, tokens: int, _seconds: float, k=k, order=order) -> None:
            losses[k, order.index(mask)] = nll / tokens

        evaluator.evaluate(order, record)
        print(f"level {level}: dense {losses[k, 0]:.4f}, types {np.round(losses[k, 1:], 4)}")
    return {
        "levels": levels,
        "types": list(masks),
        "params": params,
        "attention": engine.family.attention,
        "n_blocks": engine.n_blocks,
        "damage": (losses[:, 1:] - losses[:, :1]).tolist(),  # [levels, types]
        "coalitions": len(levels) * (len(masks) + 1),
        "seconds": time.perf_counter() - start,
        "probes": {str(s): str(p.relative_to(args.workdir)) for s, p in probes.items()},
    }


def shared_profile(game: dict, target: float) -> list[dict[str, float]]:
    """One curvature for all types (svnup-fit's model): a fixed offset per type."""
    from svnup.allocation import fit_damage

    curvature, scale = fit_damage(np.asarray(game["damage"]), np.asarray(game["levels"]))
    scales = dict(zip(game["types"], scale, strict=True))
    offsets = profile_offsets(scales, curvature, game["params"], game["attention"])
    game["fit"] = {"curvature": curvature, "scales": scale.tolist(), "offsets": offsets}
    return [{t: target + offsets[t] for t in game["types"]}] * game["n_blocks"]


def per_type_plan(game: dict, across: dict) -> list[dict[str, float]]:
    """A curve per type (``split: types``'s, ``svnup.allocation.type_curves``), each half of
    ``across`` split at its mean (``svnup.players.type_layer_sparsities``)."""
    from svnup.allocation import type_curves
    from svnup.players import make_players, type_layer_sparsities

    curvatures, scales = type_curves(np.asarray(game["damage"]), np.asarray(game["levels"]))
    curves = dict(zip(game["types"], zip(curvatures, scales, strict=True), strict=True))
    game["fit"] = {"curves": {t: [float(c), float(a)] for t, (c, a) in curves.items()}}
    params, attention = game["params"], game["attention"]
    shapes = [{t: (params[t], 1) for t in game["types"]}] * game["n_blocks"]
    players = make_players("halves", shapes, attention)
    means = []
    for player in players:
        layers = across["layer_sparsities"][player.block]
        held = sum(params[t] for t in player.layers)
        means.append(sum(layers[t] * params[t] for t in player.layers) / held)
    return type_layer_sparsities(players, means, [params] * game["n_blocks"], curves, (0.0, 0.99))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    game = json.loads(args.game.read_text())["type_game"] if args.game else play(args)
    if args.split == "shared":
        layers = shared_profile(game, args.target)
    else:
        layers = per_type_plan(game, json.loads(args.across.read_text()))
    result = {"target": args.target, "split": args.split, "layer_sparsities": layers}
    args.out.write_text(json.dumps({**result, "type_game": game}, indent=1) + "\n")
    print(json.dumps(game.get("fit"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
