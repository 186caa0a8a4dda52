"""EvoPress (Sieberling et al., ICML 2025; IST-DASLab/EvoPress): an evolutionary search over the
sparsity of every linear layer, in level steps that each prune the same number of weights.

Every linear layer (unit) is pruned once at each level l of a range around the target S: level l
prunes S x numel + l x ``weights_diff`` of its weights, from the dense model's inputs (the level
database). An allocation is one level per unit; its levels sum to 0, so every allocation prunes
exactly S of all weights. The search starts from uniform (all levels 0). Each generation mutates
the parent into distinct offspring, each by min(U1, U2) level switches (U uniform on 1-3), a
switch moving one random unit a level down and another a level up, then selects in steps: the
candidates are scored on a fresh minibatch of calibration tokens, the best few survive to the next
step and its larger minibatch, and the last step adds the parent back (elitism). The score is the
KL divergence of the next-token distributions from the dense model's (or the perplexity).

Where svnup departs from the reference code, and why:

- ``weights_diff`` is a fraction of the mean linear layer's weights, so a step moves the share
  that 1,000,000 weights are of LLaMA-7B's mean linear layer (28.9M) on any model; the default
  0.03459 is 1,000,022 weights there (``weights_per_step``).
- Levels stay below 100% sparsity (svnup's kernels prune below it) and, in the search, within the
  allocation bounds (allocation.min and max); the reference allows exactly 100%.
- Each generation draws its random numbers from a generator seeded by (seed, generation), in the
  reference's order, so a killed search resumes at its last finished generation with the draws an
  uninterrupted one makes. The minibatches are drawn from svnup's calibration sequences, which
  also built the database (the reference calibrates and searches on separate samples).
- The search scores the database's weights, as the reference does; the run is then pruned by the
  prune stage at the found per-layer sparsities, sequentially like every other allocation.
- The reference's limits on a level and on the total deviation (off by default) are not offered.

Beyond the reference, off by default (``allocation.evopress``): ``start: svnup-fit`` starts the
search from svnup-fit's allocation of the same target, at the nearest levels whose sum is 0
(``nearest_levels``), instead of uniform; ``patience`` stops the search once the best fitness has
not improved (by more than ``tolerance`` of itself) for that many generations (``plateaued``).
Prefix sharing (``LevelScorer``) changes the time of a search, never its result.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from svnup.io import atomic_path, open_h5
from svnup.models import BlockModel, linear_layers

# Decoded level weights kept for reuse (a candidate differs from its parent in a few units, and
# every candidate returns the units the previous one changed to the parent's levels).
LEVEL_CACHE_BYTES = 1 << 31
# The base allocation's hidden states of a minibatch kept for prefix sharing (LevelScorer).
PREFIX_CACHE_BYTES = 1 << 31
# Consecutive duplicate offspring after which a model is taken to have too few distinct ones.
MAX_DUPLICATES = 10_000

Levels = list[int]
Minibatch = tuple[tuple[int, int], ...]  # (calibration row, tokens of it), the last one cut short


@dataclass(frozen=True)
class Unit:
    """A linear layer of the search and the levels it can take (``lowest`` <= 0 <= ``highest``)."""

    block: int
    name: str
    shape: tuple[int, int]
    lowest: int
    highest: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def weights_per_step(fraction: float, numels: Sequence[int]) -> int:
    """Weights one level step moves: ``fraction`` of the mean linear layer's weights."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"allocation.evopress.weights_diff must be in (0, 1], got {fraction}")
    return max(1, round(fraction * sum(numels) / len(numels)))


def level_sparsity(target: float, level: int, step: int, numel: int) -> float:
    """The sparsity of a unit of ``numel`` weights at ``level``: target + level x step / numel."""
    return max(0.0, target + level * step / numel)


def level_range(target: float, numel: int, step: int, num_levels: int) -> tuple[int, int]:
    """The reference's levels of a unit: up to ``num_levels`` each side of the target while the
    sparsity stays within [0, 1], here below 1."""
    share = step / numel
    lowest = -min(int(target // share), num_levels)
    highest = min(int((1 - target) // share), num_levels)
    while highest > 0 and level_sparsity(target, highest, step, numel) >= 1.0:
        highest -= 1
    return lowest, highest


def within_bounds(unit: Unit, target: float, step: int, bounds: tuple[float, float]) -> Unit:
    """The unit with only the levels whose sparsity lies within the allocation bounds."""
    lo, hi = bounds
    lowest, highest = unit.lowest, unit.highest
    while lowest < 0 and level_sparsity(target, lowest, step, unit.numel) < lo:
        lowest += 1
    while highest > 0 and level_sparsity(target, highest, step, unit.numel) > hi:
        highest -= 1
    return Unit(unit.block, unit.name, unit.shape, lowest, highest)


def check_movable(units: Sequence[Unit]) -> None:
    """A level switch needs a unit that can go down and one that can go up."""
    if not any(u.lowest < 0 for u in units) or not any(u.highest > 0 for u in units):
        raise ValueError(
            "no linear layer has a level below and one above the target within the bounds: "
            "allocation.evopress.weights_diff is too large for this model, or the allocation "
            "bounds too tight; lower weights_diff or widen allocation.min and max"
        )


def mutate(parent: Levels, units: Sequence[Unit], rng: random.Random) -> Levels:
    """The parent after min(U1, U2) level switches, U uniform on {1, 2, 3}: each moves a random
    unit that can go down a level down and a random unit that can go up a level up."""
    child = list(parent)
    last = len(child) - 1
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        down = rng.randint(0, last)
        while child[down] - 1 < units[down].lowest:
            down = rng.randint(0, last)
        up = rng.randint(0, last)
        while child[up] + 1 > units[up].highest:
            up = rng.randint(0, last)
        child[down] -= 1
        child[up] += 1
    return child


def offspring(parent: Levels, units: Sequence[Unit], count: int, rng: random.Random) -> list:
    """``count`` distinct mutations of the parent (which may be among them)."""
    children: list[Levels] = []
    duplicates = 0
    while len(children) < count:
        child = mutate(parent, units, rng)
        if child in children:
            duplicates += 1
            if duplicates > MAX_DUPLICATES:
                raise ValueError(
                    f"allocation.evopress.offspring {count}: this model's levels allow fewer "
                    "distinct offspring; lower offspring"
                )
            continue
        duplicates = 0
        children.append(child)
    return children


def draw_minibatch(rng: random.Random, n_rows: int, seqlen: int, tokens: int) -> Minibatch:
    """Distinct random calibration rows holding exactly ``tokens`` tokens, the last row cut short
    to its first tokens where the count is not a multiple of the sequence length."""
    if tokens > n_rows * seqlen:
        raise ValueError(
            f"allocation.evopress.tokens {tokens} exceeds the {n_rows} x {seqlen} calibration "
            "tokens; lower it or raise calibration.nsamples"
        )
    rows: list[tuple[int, int]] = []
    used = 0
    while used < tokens:
        row = rng.randint(0, n_rows - 1)
        if any(row == r for r, _ in rows):
            continue
        rows.append((row, min(seqlen, tokens - used)))
        used += rows[-1][1]
    return tuple(rows)


Fitness = Callable[[Levels, Minibatch], float]


def generation(
    parent: Levels,
    units: Sequence[Unit],
    rng: random.Random,
    fitness: Fitness,
    n_offspring: int,
    survivors: Sequence[int],
    tokens: Sequence[int],
    n_rows: int,
    seqlen: int,
) -> tuple[Levels, float]:
    """One generation: offspring of the parent, then selection in steps (``survivors[k]`` of the
    candidates kept on ``tokens[k]`` fresh calibration tokens; the parent rejoins at the last
    step). Returns the new parent and its fitness on the last minibatch (lower is better)."""
    candidates = offspring(parent, units, n_offspring, rng)
    scores: list[float] = []
    for step, (keep, count) in enumerate(zip(survivors, tokens, strict=True)):
        if step == len(survivors) - 1 and parent not in candidates:
            candidates.append(parent)
        batch = draw_minibatch(rng, n_rows, seqlen, count)
        scored = [fitness(candidate, batch) for candidate in candidates]
        best = sorted(range(len(candidates)), key=scored.__getitem__)[:keep]
        candidates, scores = [candidates[i] for i in best], [scored[i] for i in best]
    return candidates[0], scores[0]


def generation_rng(seed: int, index: int) -> random.Random:
    """The random numbers of one generation, the same whenever it runs."""
    return random.Random(f"evopress:{seed}:{index}")


def nearest_levels(
    units: Sequence[Unit], sparsities: Sequence[float], target: float, step: int
) -> Levels:
    """The allocation nearest per-unit ``sparsities`` whose levels sum to 0: each unit at its
    nearest level within its range, then, while the sum is off, the unit rounded furthest the
    wrong way (within range) moved a level toward its exact level, one level at a time."""
    exact = [(s - target) * u.numel / step for u, s in zip(units, sparsities, strict=True)]
    levels = [min(max(round(x), u.lowest), u.highest) for u, x in zip(units, exact, strict=True)]
    while (total := sum(levels)) != 0:
        move = -1 if total > 0 else 1
        movable = [
            i for i, u in enumerate(units) if u.lowest <= levels[i] + move <= u.highest
        ]  # never empty: every range holds 0, so the sum can reach 0
        index = max(movable, key=lambda i: (levels[i] - exact[i]) * -move)
        levels[index] += move
    return levels


def plateaued(fitness: Sequence[float], patience: int | None, tolerance: float) -> bool:
    """Whether the last ``patience`` generations' fitness (lower is better) all failed to fall
    below the best before them by more than ``tolerance`` of it; never with ``patience`` None.
    A fall within the tolerance is not an improvement and leaves the best where it was."""
    if patience is None or not fitness:
        return False
    best, stale = fitness[0], 0
    for value in fitness[1:]:
        if value < best - tolerance * abs(best):
            best, stale = value, 0
        else:
            stale += 1
    return stale >= patience


# --- the level database -------------------------------------------------------------------


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # HDF5 has no bfloat16: its bits, as int16
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def save_database(path, units: Iterable[tuple[Unit, dict[int, torch.Tensor]]], attrs: dict) -> None:
    """HDF5: per unit and level the pruned mask, bit-packed (True = pruned), and for a pruner that
    rewrites weights (SparseGPT) the kept values in the model's dtype, row-major."""
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        blocks = f.create_group("units")
        for unit, weights in units:
            if str(unit.block) not in blocks:  # a block's layers in the order the block has them
                blocks.create_group(str(unit.block), track_order=True)
            group = blocks[str(unit.block)].create_group(unit.name)
            group.attrs.update(shape=unit.shape, lowest=unit.lowest, highest=unit.highest)
            for level, tensor in weights.items():
                mask = tensor if tensor.dtype == torch.bool else tensor == 0
                data = np.packbits(mask.cpu().numpy().reshape(-1))
                group.create_dataset(f"mask/{level}", data=data, compression="gzip")
                if tensor.dtype != torch.bool:
                    group.create_dataset(f"kept/{level}", data=_to_numpy(tensor[~mask].cpu()))
        f.attrs["meta"] = json.dumps(attrs, sort_keys=True)


class LevelDatabase:
    """A level database written by ``save_database``, read one (unit, level) at a time."""

    def __init__(self, path) -> None:
        self._file = open_h5(path, "r")
        self.meta = json.loads(self._file.attrs["meta"])
        self.units = [
            Unit(
                int(block),
                name,
                tuple(int(n) for n in group.attrs["shape"]),
                int(group.attrs["lowest"]),
                int(group.attrs["highest"]),
            )
            for block in sorted(self._file["units"], key=int)
            for name, group in self._file["units"][block].items()
        ]

    def close(self) -> None:
        self._file.close()

    def weight(self, unit: Unit, level: int, dense: torch.Tensor) -> torch.Tensor:
        """The unit's weight at ``level``: ``dense`` with the level's mask zeroed, or the level's
        own weights where the pruner rewrote them; on ``dense``'s device and in its dtype."""
        if not unit.lowest <= level <= unit.highest:
            raise ValueError(f"unit {unit.block}.{unit.name} has no level {level}")
        group = self._file[f"units/{unit.block}/{unit.name}"]
        bits = np.unpackbits(group[f"mask/{level}"][()], count=unit.numel)
        mask = torch.from_numpy(bits.reshape(unit.shape).astype(bool)).to(dense.device)
        if f"kept/{level}" not in group:
            return dense.masked_fill(mask, 0)
        weight = torch.zeros(unit.shape, dtype=dense.dtype, device=dense.device)
        kept = _from_numpy(group[f"kept/{level}"][()], dense.dtype)
        weight[~mask] = kept.to(dense.device, dense.dtype)
        return weight


@torch.no_grad()
def database_weights(
    model: BlockModel,
    calibration: torch.Tensor,
    col_norms: list[dict[str, torch.Tensor]] | None,
    pruner: str,
    target: float,
    step: int,
    num_levels: int,
) -> Iterator[tuple[Unit, dict[int, torch.Tensor]]]:
    """Every linear layer pruned by ``pruner`` at each of its levels, from the dense model's
    inputs: SparseGPT from the Hessians of a dense pass, Wanda from the dense column norms,
    magnitude from the weights. Yields one unit at a time (masks, or SparseGPT's weights)."""
    from svnup.calibration import block_statistics
    from svnup.kernels import magnitude_mask, sparsegpt_prune, wanda_mask

    hessians = pruner == "sparsegpt"
    if hessians:
        hidden, kwargs = model.embed(calibration)
    for index, block in enumerate(model.blocks):
        with model.on_device(block):
            stats = None
            if hessians:
                stats, hidden = block_statistics(model, index, hidden, kwargs, hessian=True)
            for name, layer in linear_layers(block).items():
                weight = layer.weight.data
                shape = tuple(weight.shape)
                lowest, highest = level_range(target, weight.numel(), step, num_levels)
                unit = Unit(index, name, shape, lowest, highest)
                hessian = stats[name].pop_hessian() if stats else None
                levels = {}
                for level in range(lowest, highest + 1):
                    sparsity = level_sparsity(target, level, step, weight.numel())
                    if pruner == "sparsegpt":
                        last = level == highest
                        h = hessian if last else hessian.clone()
                        levels[level] = sparsegpt_prune(weight, h, sparsity)[0].cpu()
                    elif pruner == "wanda":
                        col = col_norms[index][name].to(weight.device)
                        levels[level] = wanda_mask(weight, col, sparsity).cpu()
                    else:
                        levels[level] = magnitude_mask(weight, sparsity).cpu()
                yield unit, levels


# --- scoring allocations --------------------------------------------------------------------


class LevelScorer:
    """The fitness of allocations: the model with every unit at its level (weights swapped in
    place, as the coalition evaluator does) scored against the dense model on minibatches.

    ``fitness`` ``kl``: the mean over predicted tokens of KL(dense || pruned) of the next-token
    distributions; ``ppl``: the perplexity of the text's next tokens. The dense model's last-block
    outputs of every calibration row are computed once; the dense distributions of a minibatch
    are kept while its candidates are scored when they fit ``reference_bytes``, else recomputed
    per candidate (the time changes, not the result).

    Prefix sharing: with a ``base`` allocation (the generation's parent, of which every candidate
    is a few switches), the base's states entering the blocks are kept for the current minibatch,
    within ``prefix_bytes`` (every block's, else evenly spaced ones), and a candidate's forward
    starts at the last kept block at or before the block of its first unit that differs from the
    base. The blocks before it hold the base's weights, so the states are the ones a full forward
    computes, bit for bit; only the time changes.
    """

    def __init__(
        self,
        model: BlockModel,
        calibration: torch.Tensor,
        database: LevelDatabase,
        units: Sequence[Unit],
        fitness: str = "kl",
        cache_bytes: int = LEVEL_CACHE_BYTES,
        reference_bytes: int | None = None,
        prefix_bytes: int = PREFIX_CACHE_BYTES,
    ) -> None:
        from svnup.evaluator import REFERENCE_CACHE_BYTES

        if fitness not in ("kl", "ppl"):
            raise ValueError(f"allocation.evopress.fitness must be kl or ppl, got {fitness!r}")
        self.model = model
        self.calibration = calibration
        self.database = database
        self.units = list(units)
        self.fitness = fitness
        self.cache_bytes = cache_bytes
        self.reference_bytes = REFERENCE_CACHE_BYTES if reference_bytes is None else reference_bytes
        self._layers = [linear_layers(model.blocks[u.block])[u.name] for u in self.units]
        self._dense = [layer.weight.data for layer in self._layers]
        self._state: list[int | None] = [None] * len(self.units)  # None: the dense weight
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._batch: tuple[Minibatch, list[dict]] | None = None
        self.prefix_bytes = prefix_bytes
        self.base: Levels | None = None
        self._prefix: tuple[Minibatch, Levels, list[dict[int, torch.Tensor]]] | None = None
        self.evaluations = 0
        self.blocks_run = 0  # block forwards of the minibatches' parts, the base's included
        with torch.no_grad():
            hidden, kwargs = model.embed(calibration)
            self._dense_last = model.forward_blocks(hidden, kwargs)

    def _weight(self, index: int, level: int) -> torch.Tensor:
        key = (index, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        weight = self.database.weight(self.units[index], level, self._dense[index])
        size = weight.numel() * weight.element_size()
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()
        if size <= self.cache_bytes:
            self._cache[key] = weight
            self._cached_bytes += size
        return weight

    def load(self, levels: Levels) -> None:
        """Put every unit at its level (only the units whose level changes are touched)."""
        for index, level in enumerate(levels):
            if self._state[index] != level:
                self._layers[index].weight.data = self._weight(index, level)
                self._state[index] = level

    def restore(self) -> None:
        """The dense weights back in every unit."""
        for index, layer in enumerate(self._layers):
            layer.weight.data = self._dense[index]
        self._state = [None] * len(self.units)

    @torch.no_grad()
    def _parts(self, batch: Minibatch) -> list[dict]:
        """The minibatch as forwards: the whole rows together, the cut one alone; with each its
        input states, its dense targets and, for KL, the dense distributions' entropy."""
        if self._batch is not None and self._batch[0] == batch:
            return self._batch[1]
        seqlen = self.calibration.shape[1]
        groups = [[r for r, n in batch if n == seqlen]] + [[r] for r, n in batch if n < seqlen]
        lengths = [seqlen] + [n for _, n in batch if n < seqlen]
        parts = []
        for rows, length in zip(groups, lengths, strict=True):
            if not rows or length < 2:
                continue
            ids = self.calibration[rows, :length]
            dense = self._dense_last[rows, :length]
            part = {"ids": ids, "inputs": self.model.embed(ids), "predictions": ids[:, 1:].numel()}
            if self.fitness == "kl":
                if ids[:, 1:].numel() * self.model.vocab_size * 4 <= self.reference_bytes:
                    part["probs"] = self.model.next_token_probs(dense, ids)
                else:
                    part["dense"] = dense
                part["entropy"] = float(self._cross_entropy(dense, part).sum())
            parts.append(part)
        self._batch = (batch, parts)
        return parts

    def _cross_entropy(self, hidden: torch.Tensor, part: dict) -> torch.Tensor:
        return self.model.sequence_nll(
            hidden, part["ids"], reference=part.get("dense"), reference_probs=part.get("probs")
        )

    def _forward(self, part: dict, start: int, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output from ``hidden`` entering block ``start``."""
        n_blocks = self.model.n_blocks
        self.blocks_run += n_blocks - start
        return self.model.forward_blocks(hidden, part["inputs"][1], range(start, n_blocks))

    def _base_states(self, batch: Minibatch, parts: list[dict]) -> list[dict[int, torch.Tensor]]:
        """Per part, the base's kept states by the block they enter (``n_blocks``: the output)."""
        if self._prefix is not None and self._prefix[:2] == (batch, self.base):
            return self._prefix[2]
        self._prefix = None  # the old states go before the new ones are made
        n_blocks = self.model.n_blocks
        state_bytes = sum(p["inputs"][0].numel() * p["inputs"][0].element_size() for p in parts)
        fit = self.prefix_bytes // max(state_bytes, 1)
        if not fit:  # no state fits: every forward starts at block 0
            return [{} for _ in parts]
        stride = -(-n_blocks // fit)
        self.load(self.base)
        states = []
        for part in parts:
            hidden, kept = part["inputs"][0], {}
            for index in range(n_blocks):
                hidden = self.model.forward_block(index, hidden, part["inputs"][1])
                if (index + 1) % stride == 0:
                    kept[index + 1] = hidden
            self.blocks_run += n_blocks
            states.append(kept)
        self._prefix = (batch, list(self.base), states)
        return states

    @torch.no_grad()
    def __call__(self, levels: Levels, batch: Minibatch) -> float:
        parts = self._parts(batch)
        start, states = 0, [{} for _ in parts]
        if self.base is not None:
            states = self._base_states(batch, parts)
            changed = [i for i, (a, b) in enumerate(zip(levels, self.base, strict=True)) if a != b]
            start = self.units[changed[0]].block if changed else self.model.n_blocks
        self.load(levels)
        self.evaluations += 1
        total, predictions = 0.0, 0
        for part, kept in zip(parts, states, strict=True):
            entry = max((b for b in kept if b <= start), default=0)
            hidden = self._forward(part, entry, kept[entry] if entry else part["inputs"][0])
            if self.fitness == "kl":
                total += float(self._cross_entropy(hidden, part).sum()) - part["entropy"]
            else:
                total += float(self.model.sequence_nll(hidden, part["ids"]).sum())
            predictions += part["predictions"]
        mean = total / max(predictions, 1)
        return mean if self.fitness == "kl" else float(np.exp(mean))
