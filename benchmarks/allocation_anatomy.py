"""Where a per-linear allocation's gain comes from: prune and evaluate allocations recombined
from budgets, the across-block part of one with the within-half part of another.

Why: EvoPress sets every linear layer's sparsity, svnup-fit on halves only each block's attention
and MLP half. Whether a per-linear allocation is lower because of how it spreads sparsity across
the blocks or because of how it splits a half between its layers decides what svnup should build.
Each budget JSON (``results/<model>/budget/<method>/<key>/s<S>.json``) gives per-linear (or
per-block) sparsities; the recombined allocations are

- ``NAME``: the budget as it is;
- ``NAME-halves``: each linear at its half's parameter-weighted mean (the within-half split
  removed);
- ``ACROSS+WITHIN-profile``: ACROSS's half sparsities, each linear moved by WITHIN's offset of
  its layer type from its half's mean, averaged over the blocks; where that leaves [min, max]
  the layer is clipped and the half's other layers shift together, so every half's mean, and so
  the total, stays exactly ACROSS's.
- ``uniform+NAME-types`` and ``uniform+NAME-block-types``, for a budget of
  ``allocation.svnup-fit.split: types`` (it holds ``type_curves``): every half, or every whole
  block, at the target, split between its layers by NAME's type curves; the type game's split
  without svnup-fit's across-block allocation, so without its games.

All are pruned with one pruner from the folder's calibration record and evaluated on the
folder's evaluation set and sequence length (its ``config.yaml``), one thread.

    python benchmarks/allocation_anatomy.py --workdir benchmarks/.cache/allocation-smollm2 \\
        --budget evopress=PATH --budget svnup-fit=PATH --pruner sparsegpt --windows 64 --out T.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from svnup.allocation import fit_mean
from svnup.players import Player, make_players, type_layer_sparsities

Plan = list[dict[str, float]]  # each block's {linear layer: sparsity}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="a bench_allocation.py folder")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--pruner", default="sparsegpt")
    p.add_argument(
        "--windows", type=int, default=64, help="first windows of the evaluation set (0: all)"
    )
    p.add_argument("--only", nargs="*", default=None, help="names of the allocations to run")
    p.add_argument("--out", type=Path, required=True, help="Markdown table (appended per row)")
    args = p.parse_args(argv)
    args.budgets = {}
    for item in args.budget:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--budget {item}: write NAME=PATH to a budget JSON")
        args.budgets[name] = json.loads(Path(path).read_text())
    if not (args.workdir / "config.yaml").is_file():
        p.error(f"--workdir {args.workdir}: no config.yaml; run bench_allocation.py there first")
    return args


def half_mean(plan: Plan, half: Player, params: Sequence[dict[str, int]]) -> float:
    sizes = params[half.block]
    return sum(plan[half.block][n] * sizes[n] for n in half.layers) / half.params


def flattened(plan: Plan, halves: Sequence[Player], params: Sequence[dict[str, int]]) -> Plan:
    """Each linear at its half's parameter-weighted mean sparsity."""
    out: Plan = [{} for _ in plan]
    for half in halves:
        out[half.block].update(dict.fromkeys(half.layers, half_mean(plan, half, params)))
    return out


def within_profile(
    plan: Plan, halves: Sequence[Player], params: Sequence[dict[str, int]]
) -> dict[str, float]:
    """Each layer type's offset from its half's mean, averaged over the blocks."""
    offsets: dict[str, list[float]] = {}
    for half in halves:
        mean = half_mean(plan, half, params)
        for name in half.layers:
            offsets.setdefault(name, []).append(plan[half.block][name] - mean)
    return {name: sum(values) / len(values) for name, values in offsets.items()}


def with_profile(
    plan: Plan,
    halves: Sequence[Player],
    params: Sequence[dict[str, int]],
    profile: dict[str, float],
    low: float = 0.0,
    high: float = 0.99,
) -> Plan:
    """``plan``'s half means with ``profile``'s within-half offsets, shifted together where a
    layer is clipped so that each half's mean stays (``svnup.allocation.fit_mean``)."""
    out: Plan = [{} for _ in plan]
    for half in halves:
        mean = half_mean(plan, half, params)
        base = np.array([mean + profile[n] for n in half.layers])
        sizes = np.array([params[half.block][n] for n in half.layers], dtype=np.float64)
        moved = fit_mean(base, np.ones_like(base), sizes / sizes.sum(), mean, low, high)
        out[half.block].update(zip(half.layers, moved.tolist(), strict=True))
    return out


def per_linear(budget: dict, params: Sequence[dict[str, int]]) -> Plan:
    """A budget's per-linear sparsities; a budget of whole blocks gives each linear its block's."""
    if budget.get("layer_sparsities"):
        return [dict(layers) for layers in budget["layer_sparsities"]]
    return [dict.fromkeys(sizes, s) for sizes, s in zip(params, budget["sparsities"], strict=True)]


def total(plan: Plan, params: Sequence[dict[str, int]]) -> float:
    """The parameter-weighted mean sparsity of the whole plan."""
    zeros = sum(
        layers[n] * sizes[n] for layers, sizes in zip(plan, params, strict=True) for n in layers
    )
    return zeros / sum(sum(sizes.values()) for sizes in params)


def recombined(
    plans: dict[str, Plan], halves: Sequence[Player], params: Sequence[dict[str, int]]
) -> dict[str, Plan]:
    """Every budget, its flattened halves and each cross profile; of identical allocations only
    the first name is kept."""
    candidates = dict(plans)
    for name, plan in plans.items():
        candidates[f"{name}-halves"] = flattened(plan, halves, params)
    for across, plan in plans.items():
        for within, source in plans.items():
            if within != across:
                profile = within_profile(source, halves, params)
                candidates[f"{across}+{within}-profile"] = with_profile(
                    plan, halves, params, profile
                )
    kept: dict[str, Plan] = {}
    for name, plan in candidates.items():
        same = (
            all(abs(a[n] - b[n]) < 1e-9 for a, b in zip(plan, other, strict=True) for n in a)
            for other in kept.values()
        )
        if not any(same):
            kept[name] = plan
    return kept


def uniform_type_splits(
    budgets: dict[str, dict], halves: Sequence[Player], params: Sequence[dict[str, int]]
) -> dict[str, Plan]:
    """For each budget with ``type_curves``: every half and every block at its target, split
    by those curves (``svnup.players.type_layer_sparsities``)."""
    blocks = [
        Player(b, tuple(sizes), sum(sizes.values()), str(b)) for b, sizes in enumerate(params)
    ]
    plans: dict[str, Plan] = {}
    for name, budget in budgets.items():
        if "type_curves" not in budget:
            continue
        curves = {t: (c["curvature"], c["scale"]) for t, c in budget["type_curves"].items()}
        for label, players in (("types", halves), ("block-types", blocks)):
            plans[f"uniform+{name}-{label}"] = type_layer_sparsities(
                players, [budget["target"]] * len(players), params, curves, (0.0, 0.99)
            )
    return plans


def main(argv: list[str] | None = None) -> int:
    import torch

    from svnup.calibration import load_statistics
    from svnup.data import resolve_protocol
    from svnup.models import linear_layers, load_model
    from svnup.perplexity import dataset_perplexity
    from svnup.pruning import prune_model

    args = _parse(argv)
    torch.set_num_threads(1)
    settings = yaml.safe_load((args.workdir / "config.yaml").read_text())
    seqlen = settings["models"][args.model]["seqlen"]
    dataset = args.workdir / settings["evaluation"]["datasets"][0]
    root = args.workdir / "results" / args.model
    calibration = next((root / "calibration").glob("*/calibration.h5"))
    model_dir = args.workdir / "models" / args.model

    engine, _ = load_model(model_dir, dtype="float32", device="cpu", with_tokenizer=False)
    shapes = [
        {name: tuple(layer.weight.shape) for name, layer in linear_layers(block).items()}
        for block in engine.blocks
    ]
    halves = make_players("halves", shapes, engine.family.attention)
    del engine
    params = [{name: shape[0] * shape[1] for name, shape in block.items()} for block in shapes]
    plans = {name: per_linear(budget, params) for name, budget in args.budgets.items()}
    target = args.budgets[next(iter(plans))]["target"]
    allocations = {
        name: plan
        for name, plan in (
            recombined(plans, halves, params) | uniform_type_splits(args.budgets, halves, params)
        ).items()
        if args.only is None or name in args.only
    }
    for name, plan in allocations.items():  # before any pruning
        if abs(total(plan, params) - target) > 1e-6:
            raise SystemExit(f"{name}: total {total(plan, params):.6f}, target {target}")

    ids, _, _ = load_statistics(calibration)
    if not args.out.exists():
        command = " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(
            f"# Allocation anatomy: {args.model}, {args.pruner} at {target:.0%}\n\n"
            f"- command: `python benchmarks/allocation_anatomy.py {command}`\n"
            f"- calibration `{calibration.relative_to(args.workdir)}`; "
            f"{f'the first {args.windows}' if args.windows else 'all'} windows of {seqlen} "
            f"tokens of `{settings['evaluation']['datasets'][0]}`\n\n"
            "| allocation | perplexity | prune s | evaluate s |\n| --- | --- | --- | --- |\n"
        )
    for name, plan in allocations.items():
        engine, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
        start = time.perf_counter()
        block_means = [total([layers], [sizes]) for layers, sizes in zip(plan, params, strict=True)]
        prune_model(engine, ids, block_means, method=args.pruner, layer_sparsities=plan)
        pruned = time.perf_counter()
        result = dataset_perplexity(
            engine,
            tokenizer,
            str(dataset),
            split="test",
            seqlen=seqlen,
            windows=args.windows or None,
            protocol=resolve_protocol(str(dataset)),  # as the evaluate stage guesses it
        )
        seconds = time.perf_counter() - pruned
        with args.out.open("a") as f:
            f.write(f"| {name} | {result.ppl:.2f} | {pruned - start:.0f} | {seconds:.0f} |\n")
        print(name, f"{result.ppl:.4f}", flush=True)
        del engine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
