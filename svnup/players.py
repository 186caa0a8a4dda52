"""The players of the coalition game: whole blocks, each block's attention and MLP halves, or
every linear layer.

With ``shapley.players: halves`` a block's attention layers and its MLP layers are two players:
a coalition prunes (at the probe sparsity) exactly the halves it names, each allocation method
gives every half its own sparsity, and pruning sets each linear layer to its half's sparsity.
Player ``2b`` is block b's attention and ``2b + 1`` its MLP, so a mask over halves reads like a
mask over blocks with each bit doubled. The halves are told apart by the family's attention
module (``Family.attention``): every linear layer under it is attention, every other one MLP.
With ``layers`` every linear layer is a player of its own, block by block in the order the block
holds them (q, k, v, o, gate, up, down in a LLaMA block): 224 players for LLaMA-7B. The same
players carry per-linear allocations that do not come from a game (EvoPress, LSA by projection).

The type game (``allocation.svnup-fit.split: types``, and ``svnup-types``) plays the ``layers``
players in groups: each coalition prunes one layer type (q_proj, ..., down_proj) in every block
at once (``type_masks``), and each larger player's sparsity is then split between its layers
where their types' marginal damages per weight meet (``type_layer_sparsities``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("blocks", "halves", "layers")
HALVES = ("attention", "mlp")


@dataclass(frozen=True)
class Player:
    """One player: the linear layers of one block that a coalition ablates together."""

    block: int
    layers: tuple[str, ...]
    params: int
    name: str

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown players {kind!r}; choose one of {', '.join(KINDS)}")


def players_per_block(kind: str) -> int:
    """Players a block holds, for the kinds whose count does not depend on the model (for
    ``layers`` it is the block's linear layer count: ``svnup.preflight.linear_layer_count``)."""
    _check_kind(kind)
    if kind == "layers":
        raise ValueError("players 'layers' are a model's linear layers; count them on the model")
    return 1 if kind == "blocks" else len(HALVES)


def make_players(
    kind: str, layer_shapes: Sequence[Mapping[str, Sequence[int]]], attention: str
) -> list[Player]:
    """The players of ``kind`` for blocks whose linear layers have ``layer_shapes[b]``
    (name -> weight shape); ``attention`` is the attention module's name inside a block."""
    _check_kind(kind)
    players = []
    for block, shapes in enumerate(layer_shapes):
        params = {name: math.prod(shape) for name, shape in shapes.items()}
        if kind == "blocks":
            players.append(Player(block, tuple(shapes), sum(params.values()), str(block)))
            continue
        if kind == "layers":
            players += [Player(block, (n,), params[n], f"{block}.{n}") for n in shapes]
            continue
        groups = {
            half: tuple(n for n in shapes if n.startswith(f"{attention}.") == (half == "attention"))
            for half in HALVES
        }
        for half, layers in groups.items():
            if not layers:
                raise ValueError(
                    f"block {block} has no {half} linear layers (attention module "
                    f"{attention!r}; layers: {', '.join(shapes)}); use shapley.players: blocks"
                )
            total = sum(params[name] for name in layers)
            players.append(Player(block, layers, total, f"{block}.{half}"))
    return players


def players_from_json(rows: Sequence[Mapping]) -> list[Player]:
    return [
        Player(int(r["block"]), tuple(r["layers"]), int(r["params"]), str(r["name"])) for r in rows
    ]


def block_masks(players: Sequence[Player], n_blocks: int) -> list[int]:
    """For each block, the bits of a coalition mask that belong to its players."""
    masks = [0] * n_blocks
    for bit, player in enumerate(players):
        masks[player.block] |= 1 << bit
    return masks


def layer_sparsities(
    players: Sequence[Player], sparsities: Sequence[float], n_blocks: int
) -> list[dict[str, float]]:
    """Each block's {linear layer: sparsity} from one sparsity per player."""
    if len(sparsities) != len(players):
        raise ValueError(f"got {len(sparsities)} sparsities for {len(players)} players")
    layers: list[dict[str, float]] = [{} for _ in range(n_blocks)]
    for player, sparsity in zip(players, sparsities, strict=True):
        layers[player.block].update(dict.fromkeys(player.layers, float(sparsity)))
    return layers


def block_sparsities(
    players: Sequence[Player], sparsities: Sequence[float], n_blocks: int
) -> list[float]:
    """Each block's parameter-weighted mean sparsity over its players."""
    zeros, params = [0.0] * n_blocks, [0] * n_blocks
    for player, sparsity in zip(players, sparsities, strict=True):
        zeros[player.block] += float(sparsity) * player.params
        params[player.block] += player.params
    return [z / p for z, p in zip(zeros, params, strict=True)]


def type_masks(players: Sequence[Player]) -> dict[str, int]:
    """Each linear-layer type's coalition over ``layers`` players: the bits of the layer of that
    name in every block. Every block must hold the same layer names."""
    masks: dict[str, int] = {}
    names: list[set[str]] = []
    for bit, player in enumerate(players):
        if len(player.layers) != 1:
            raise ValueError(f"type masks need players 'layers', got player {player.name}")
        (name,) = player.layers
        masks[name] = masks.get(name, 0) | 1 << bit
        if player.block == len(names):
            names.append(set())
        names[player.block].add(name)
    if any(block != names[0] for block in names):
        raise ValueError(
            "the blocks hold different linear layers, so no layer type spans every block; "
            "remove allocation.svnup-fit.split"
        )
    return masks


def type_layer_sparsities(
    players: Sequence[Player],
    sparsities: Sequence[float],
    layer_params: Sequence[Mapping[str, int]],
    curves: Mapping[str, tuple[float, float]],
    bounds: tuple[float, float],
) -> list[dict[str, float]]:
    """Each block's {linear layer: sparsity}: every player's sparsity split between its layers at
    equal marginal damage per weight, by their types' curves {name: (curvature, scale)}
    (``svnup.allocation.split_at_equal_marginal``), so each player keeps its weighted mean."""
    from svnup.allocation import split_at_equal_marginal

    if len(sparsities) != len(players):
        raise ValueError(f"got {len(sparsities)} sparsities for {len(players)} players")
    missing = {n for p in players for n in p.layers} - set(curves)
    if missing:
        raise ValueError(f"the type game has no curve for layers {', '.join(sorted(missing))}")
    layers: list[dict[str, float]] = [{} for _ in range(len(layer_params))]
    for player, sparsity in zip(players, sparsities, strict=True):
        names = list(player.layers)
        split = split_at_equal_marginal(
            float(sparsity),
            np.array([layer_params[player.block][n] for n in names], dtype=np.float64),
            np.array([curves[n][0] for n in names]),
            np.array([curves[n][1] for n in names]),
            bounds,
        )
        layers[player.block].update(zip(names, split.tolist(), strict=True))
    return layers
