"""What each number was made from: budget checks, checkpoint identities, and the check that the
numbers of one run belong to the same checkpoint.

A budget is read by several stages (prune, recipe, collect, report) and can be edited by hand, so
every reader checks that it still is an allocation: one sparsity per block in [0, 1), player and
layer entries that agree with them, and a parameter-weighted mean on its target.

A pruned checkpoint's *identity* is a hash of what it was made from (the prune spec, the model
spec, the budget file's bytes and the calibration file's content fingerprint): pruning again from
the same files gives the same identity, so evaluations finished before a temporary checkpoint was
re-made still belong to it. A dense model's identity is the key of its model spec. The prune stage
records the identity in prune.json and in the checkpoint's svnup.json; evaluate and zeroshot
record the identity of the checkpoint they read; collect refuses to pair numbers whose identities
differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

from svnup.export import SIDECAR
from svnup.io import REBUILD, CorruptFileError, read_json

# How close the weighted mean of a budget's sparsities must be to its target.
MEAN_TOLERANCE = 1e-6
BUDGET_KEYS = ("spec", "target", "achieved", "sparsities", "block_params", "importance", "scores")


def budget_error(path: str | Path, reason: str, fix: str = REBUILD) -> CorruptFileError:
    """The one-line error of a budget file that is no allocation."""
    error = CorruptFileError(f"{path} is not a valid budget ({reason}); {fix}")
    error.path, error.reason = str(path), reason
    return error


def _fraction(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_budget(
    plan, path: str | Path, target: float | None = None, spec_key: str | None = None
) -> dict:
    """``plan`` (a budget read from ``path``) if it is an allocation; else a one-line
    CorruptFileError. ``target`` and ``spec_key`` are what the reader expects (the target sparsity
    and the key of the budget spec) when it knows them."""
    from svnup.config import key

    if not isinstance(plan, dict):
        raise budget_error(path, f"a JSON {type(plan).__name__}, not an object")
    missing = [k for k in BUDGET_KEYS if k not in plan]
    if missing:
        raise budget_error(path, f"no {', '.join(missing)}")
    spec, sparsities, params = plan["spec"], plan["sparsities"], plan["block_params"]
    if not isinstance(spec, dict) or "method" not in spec:
        raise budget_error(path, "its spec names no allocation method")
    if spec_key is not None and key(spec) != spec_key:
        raise budget_error(path, f"its spec has key {key(spec)}, the config's budget {spec_key}")
    if not isinstance(params, list) or not params or not all(_count(p) for p in params):
        raise budget_error(path, "block_params is not a list of positive weight counts")
    if not isinstance(sparsities, list) or len(sparsities) != len(params):
        raise budget_error(path, f"sparsities is not a list of {len(params)}, one per block")
    bad = next((s for s in sparsities if not _fraction(s)), None)
    if bad is not None:
        raise budget_error(path, f"block sparsity {bad} is outside [0, 1)")
    if not _fraction(plan["target"]) or plan["target"] == 0:
        raise budget_error(path, f"target {plan['target']} is not a sparsity in (0, 1)")
    if target is not None and not math.isclose(plan["target"], target, abs_tol=1e-12):
        raise budget_error(path, f"its target is {plan['target']}, not the run's {target}")
    mean = sum(s * p for s, p in zip(sparsities, params, strict=True)) / sum(params)
    for name, value in (("target", plan["target"]), ("achieved", plan["achieved"])):
        if not isinstance(value, int | float) or abs(mean - value) > MEAN_TOLERANCE:
            raise budget_error(
                path, f"its parameter-weighted mean sparsity {mean:.6g} is not its {name} {value}"
            )
    _check_players(plan, path)
    return plan


def _check_players(plan: dict, path: str | Path) -> None:
    """Player and layer sparsities, where a budget has them, must give its block sparsities."""
    from svnup.players import block_sparsities, layer_sparsities, players_from_json

    n_blocks = len(plan["sparsities"])
    layers = plan.get("layer_sparsities")
    if layers is not None and (
        not isinstance(layers, list)
        or len(layers) != n_blocks
        or not all(isinstance(b, dict) and b and all(map(_fraction, b.values())) for b in layers)
    ):
        raise budget_error(path, f"layer_sparsities is not {n_blocks} maps of sparsities in [0, 1)")
    if "layer_params" in plan:
        _check_layer_means(plan, path)
    if "players" not in plan:
        if "player_sparsities" in plan:
            raise budget_error(path, "player_sparsities without players")
        return
    try:
        players = players_from_json(plan["players"])
    except (TypeError, KeyError, ValueError):
        raise budget_error(path, "its players are not a list of players") from None
    given = plan.get("player_sparsities")
    if not isinstance(given, list) or len(given) != len(players) or not all(map(_fraction, given)):
        raise budget_error(path, f"player_sparsities is not {len(players)} sparsities in [0, 1)")
    if sorted({p.block for p in players}) != list(range(n_blocks)):
        raise budget_error(path, f"its players do not cover its {n_blocks} blocks")
    weights = [0] * n_blocks
    for player in players:
        weights[player.block] += player.params
    if weights != plan["block_params"]:
        raise budget_error(path, "its players' weight counts do not add up to block_params")
    derived = block_sparsities(players, given, n_blocks)
    if any(abs(a - b) > MEAN_TOLERANCE for a, b in zip(derived, plan["sparsities"], strict=True)):
        raise budget_error(path, "its block sparsities are not the means of its players'")
    if "layer_params" in plan:
        for player, sparsity in zip(players, given, strict=True):
            held = {name: plan["layer_params"][player.block][name] for name in player.layers}
            mean = sum(layers[player.block][n] * w for n, w in held.items()) / sum(held.values())
            if abs(mean - sparsity) > MEAN_TOLERANCE:
                raise budget_error(path, f"its layers' mean in player {player.name} is not its own")
    elif layers != layer_sparsities(players, given, n_blocks):
        raise budget_error(path, "its layer_sparsities are not its players' sparsities")


def _check_layer_means(plan: dict, path: str | Path) -> None:
    """A budget that splits players between their layers (``split: types``) holds each layer's
    weights: they must add up to the blocks', and each block's layer sparsities to its mean."""
    weights, layers = plan["layer_params"], plan.get("layer_sparsities")
    if (
        layers is None
        or not isinstance(weights, list)
        or [sorted(b) for b in weights if isinstance(b, dict)] != [sorted(b) for b in layers]
        or not all(_count(w) for block in weights for w in block.values())
    ):
        raise budget_error(path, "its layer_params are not a weight count for every layer")
    if [sum(block.values()) for block in weights] != plan["block_params"]:
        raise budget_error(path, "its layer_params do not add up to block_params")
    for block, (params, sparsities) in enumerate(zip(weights, layers, strict=True)):
        mean = sum(sparsities[n] * w for n, w in params.items()) / sum(params.values())
        if abs(mean - plan["sparsities"][block]) > MEAN_TOLERANCE:
            raise budget_error(path, f"its layer sparsities in block {block} miss the block's")


def read_budget(path: str | Path, target: float | None = None, spec_key: str | None = None) -> dict:
    """A budget file, checked (see ``check_budget``)."""
    return check_budget(read_json(path), path, target, spec_key)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_identity(
    prune_spec: dict, model: dict, budget: str | Path, calibration: str | Path
) -> dict:
    """``{"checkpoint_id": ..., "made_from": ...}`` of the checkpoint that pruning ``model`` with
    ``prune_spec``, the budget file ``budget`` and the calibration file ``calibration`` makes."""
    from svnup.config import key
    from svnup.content import fingerprint

    made_from = {
        "prune": key(prune_spec),
        "model": key(model),
        "budget": file_digest(budget),
        "calibration": fingerprint(calibration),
    }
    return {"checkpoint_id": key(made_from), "made_from": made_from}


def dense_identity(model: dict) -> str:
    """A dense model's identity: the key of its model spec (its dense run folder's key)."""
    from svnup.config import key

    return key(model)


def read_identity(model_dir: str | Path, model: dict) -> str:
    """The identity of the checkpoint in ``model_dir``: the dense model's when ``model_dir`` is
    ``model``'s own path, else the one its svnup.json records."""
    if str(model_dir) == model["path"]:
        return dense_identity(model)
    sidecar = Path(model_dir) / SIDECAR
    fix = f"delete the folder {model_dir} and re-run snakemake, which prunes it again"
    if not sidecar.is_file():
        raise FileNotFoundError(f"{model_dir} has no {SIDECAR}, so its identity is unknown; {fix}")
    identity = read_json(sidecar, fix).get("checkpoint_id")
    if identity is None:
        raise ValueError(f"{sidecar} records no checkpoint identity (an older svnup); {fix}")
    return identity


def pruned_identity(report: str | Path, budget: str | Path) -> str:
    """The identity prune.json ``report`` records, after checking that the budget file
    ``budget`` is still the one it was pruned with."""
    pruning = read_json(report)
    folder = Path(report).parent
    if "checkpoint_id" not in pruning:
        raise ValueError(
            f"{report} records no checkpoint identity (an older svnup); delete the folder "
            f"{folder} and re-run snakemake, which prunes and evaluates it again"
        )
    if pruning["made_from"]["budget"] != file_digest(budget):
        raise ValueError(
            f"{budget} is not the budget {report} was pruned with (it changed since); touch "
            f"{budget} and re-run snakemake, which prunes and evaluates the run again"
        )
    return pruning["checkpoint_id"]


def check_measured_on(identity: str, results: Mapping[Path, dict], described_by: str) -> None:
    """Every result (path -> its JSON) was measured on checkpoint ``identity``, the one
    ``described_by`` names; else one line naming the file and the fix."""
    for path, result in results.items():
        measured = result.get("checkpoint_id")
        if measured != identity:
            what = "no checkpoint identity" if measured is None else f"checkpoint {measured}"
            raise ValueError(
                f"{path} was measured on {what}, but {described_by} is of checkpoint {identity}; "
                "delete it and re-run snakemake, which measures the run's checkpoint again"
            )


def check_pruned_with(budget: str | Path, report: str | Path) -> None:
    """Before planning: a budget whose content changed since ``report`` was pruned with it, but
    whose time is not newer, would leave the old run in place (Snakemake goes by times); say so."""
    budget, report = Path(budget), Path(report)
    if not (budget.is_file() and report.is_file()):
        return
    made_from = read_json(report).get("made_from") or {}
    if "budget" not in made_from or made_from["budget"] == file_digest(budget):
        return
    if budget.stat().st_mtime_ns <= report.stat().st_mtime_ns:
        error = CorruptFileError(
            f"{budget} is not the budget {report} was pruned with, yet not newer, so Snakemake "
            f"would keep the old run; touch {budget} and re-run snakemake, which prunes and "
            "evaluates the run again"
        )
        error.path, error.reason = str(budget), "changed without a newer time"
        raise error


def measured_elsewhere(
    result: str | Path, prune_spec: dict, model: dict, budget: str | Path, calibration: str | Path
) -> bool:
    """Whether the result file ``result`` (an evaluation) was measured on another checkpoint than
    the one the current ``budget`` and ``calibration`` files make; False when it cannot tell
    (the result or a source is not there yet)."""
    if not all(Path(p).is_file() for p in (result, budget, calibration)):
        return False
    measured = read_json(result).get("checkpoint_id")
    return measured != checkpoint_identity(prune_spec, model, budget, calibration)["checkpoint_id"]
