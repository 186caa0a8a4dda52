"""Coalition evaluation with shared prefixes.

A coalition is the bitmask of ablated players: whole blocks by default, or smaller groups of a
block's linear layers (``svnup.players``: the attention and MLP halves). Its raw result is the
summed next-token NLL of the Shapley evaluation set when those players are ablated and everything
else is dense, against the text's next tokens or (``targets="dense"``) the dense model's
next-token distributions. Coalitions are walked as a trie over blocks 0..L-1: all coalitions
that ablate the same players of blocks 0..b-1 share the hidden states entering block b, so a
coalition that ablates blocks 9 and 11 starts from the dense states at block 9, and the sibling
coalitions of a window share every forward up to where they differ.
Ablation is applied in place by swapping weight tensors; the model is never copied.
"""

from __future__ import annotations

import collections
import functools
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from svnup.models import BlockKwargs, BlockModel, linear_layers, return_freed_memory
from svnup.players import Player, block_masks

ABLATIONS = ("prune", "skip")
TARGETS = ("text", "dense")

# The dense next-token distributions of targets="dense" are kept for the whole job when they fit
# in this many bytes (smollm2-135m at 4 x 512 tokens: 0.4 GB); above it each coalition recomputes
# them from the dense last-block output (LLaMA-7B at 16 x 2,048 tokens: 4.2 GB).
REFERENCE_CACHE_BYTES = 1 << 30

ResultCallback = Callable[[int, float, int, float], None]


@dataclass(frozen=True)
class EvaluationStats:
    coalitions: int
    block_forwards: int
    naive_block_forwards: int
    seconds: float

    @property
    def forward_ratio(self) -> float:
        return self.naive_block_forwards / max(self.block_forwards, 1)


def _ablated_weight(weight: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """The weight a probe gives a layer: ``weight`` with the mask's entries zeroed, or the probe's
    own weight."""
    if probe.dtype == torch.bool:
        return weight.masked_fill(probe.to(weight.device), 0)
    if probe.shape != weight.shape:
        raise ValueError(
            f"probe weight has shape {tuple(probe.shape)}, the layer {tuple(weight.shape)}"
        )
    return probe.to(weight.device, weight.dtype)


class CoalitionEvaluator:
    """Evaluates coalitions of ablated players on a fixed evaluation set.

    ``probes[b][layer]`` defines the ``prune`` ablation of block b's layers: a bool mask (True =
    pruned) or the weight the layer takes (see ``svnup.calibration``); the ``skip`` ablation
    replaces the block by the identity (the residual stream passes through), so it needs whole
    blocks as players. ``players`` (default: one per block) says which layers each bit of a
    coalition mask ablates. With ``targets="dense"`` a
    coalition's NLL is the cross-entropy to the dense model's next-token distributions: its KL
    divergence from the dense model plus a constant (the dense entropy), which cancels in every
    marginal contribution. It is measured on every vocabulary entry, not one sampled token; the
    dense distributions are computed once per job when they fit ``reference_cache_bytes``, which
    changes the time and memory of a job, not its results.
    """

    def __init__(
        self,
        model: BlockModel,
        input_ids: torch.Tensor,
        ablation: str = "prune",
        probes: dict[int, dict[str, torch.Tensor]] | None = None,
        targets: str = "text",
        reference_cache_bytes: int = REFERENCE_CACHE_BYTES,
        players: Sequence[Player] | None = None,
    ) -> None:
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if targets not in TARGETS:
            raise ValueError(f"unknown targets {targets!r}; choose one of {', '.join(TARGETS)}")
        if ablation == "prune" and probes is None:
            raise ValueError("ablation 'prune' needs probes for the ablated blocks")
        n_blocks = model.n_blocks
        if players is None:
            self._block_bits = [1 << b for b in range(n_blocks)]
            self._bit_layers: list[tuple[str, ...] | None] = [None] * n_blocks
        else:
            if ablation == "skip" and len(players) != n_blocks:
                raise ValueError("ablation 'skip' removes whole blocks; it needs a player a block")
            self._block_bits = block_masks(players, n_blocks)
            self._bit_layers = [player.layers for player in players]
        self.n_players = len(self._bit_layers)
        self.model = model
        self.input_ids = input_ids
        self.ablation = ablation
        self.probes = probes or {}
        self.targets = targets
        self.reference_cache_bytes = reference_cache_bytes
        self._reference: torch.Tensor | None = None
        self._reference_probs: list[torch.Tensor] | None = None
        self._pruned: dict[int, dict[str, torch.Tensor]] = {}
        self.block_forwards = 0

    @property
    def n_tokens(self) -> int:
        """Predictions per evaluation: every position but the last of every sequence."""
        return self.input_ids.shape[0] * (self.input_ids.shape[1] - 1)

    def _pruned_weights(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The pruned weights of block ``index``'s layers ``names``, made when first asked for
        (a half-block player's coalitions make only its half)."""
        made = self._pruned.get(index, {})
        missing = [name for name in names if name not in made]
        if missing:
            if index not in self.probes:
                raise KeyError(f"no probe for block {index}")
            made = self._pruned.setdefault(index, {})
            probe = self.probes[index]
            layers = linear_layers(self.model.blocks[index])
            for name in missing:
                made[name] = _ablated_weight(layers[name].weight.data, probe[name])
        return made

    def _ablated_layers(self, index: int, state: int) -> list[str]:
        """The layers of block ``index`` that the players of ``state`` (a mask's bits of that
        block) ablate."""
        names: set[str] = set()
        for bit, layers in enumerate(self._bit_layers):
            if (state >> bit) & 1:
                if layers is None:
                    return list(linear_layers(self.model.blocks[index]))
                names.update(layers)
        return sorted(names)

    def _forward(self, index: int, hidden: torch.Tensor, kwargs: BlockKwargs, state: int):
        """Block ``index`` with the players of ``state`` ablated (0: dense)."""
        if state and self.ablation == "skip":
            return hidden
        self.block_forwards += 1
        if not state:
            return self.model.forward_block(index, hidden, kwargs)
        layers = linear_layers(self.model.blocks[index])
        names = self._ablated_layers(index, state)
        dense = {name: layers[name].weight.data for name in names}
        pruned = self._pruned_weights(index, names)
        try:
            for name in names:
                layers[name].weight.data = pruned[name]
            return self.model.forward_block(index, hidden, kwargs)
        finally:
            for name in names:
                layers[name].weight.data = dense[name]

    def naive_forwards(self, mask: int) -> int:
        """Block forwards a full forward per coalition would spend on ``mask``."""
        skipped = bin(mask).count("1") if self.ablation == "skip" else 0
        return self.model.n_blocks - skipped

    @torch.no_grad()
    def evaluate(self, coalitions: Iterable[int], on_result: ResultCallback) -> EvaluationStats:
        """Evaluate each coalition once, calling ``on_result(mask, nll_sum, n_tokens, seconds)``.

        ``seconds`` is the wall time since the previous result, so the stored times add up to the
        job's time. Memory holds one set of hidden states per branching depth of the trie (two
        for leave-one-out games, the window's width for SWSV), and the pruned weights of the
        layers whose coalitions are not all finished.
        """
        masks = sorted(set(coalitions))
        n_blocks, n_players = self.model.n_blocks, self.n_players
        if masks and not (masks[0] >= 0 and masks[-1] < 1 << n_players):
            bad = masks[0] if masks[0] < 0 else masks[-1]
            raise ValueError(
                f"coalition mask {bad:#x} is outside 0 .. 2**{n_players} - 1 "
                f"(it names players beyond the game's {n_players})"
            )
        union = functools.reduce(operator.or_, masks, 0)
        bits = self._block_bits
        unprobed = [b for b in range(n_blocks) if union & bits[b] and b not in self.probes]
        if self.ablation == "prune" and unprobed:
            raise ValueError(
                f"no probe for block(s) {unprobed}, which the coalitions ablate; "
                "pass probes covering every ablated block"
            )
        if not masks:
            return EvaluationStats(0, 0, 0, 0.0)
        start = time.perf_counter()
        self.block_forwards = 0
        progress = tqdm(total=len(masks), desc="coalitions", unit="coalition")
        clock = [time.perf_counter()]
        # Coalitions still to finish that ablate each layer: at 0 its pruned weight is freed, so
        # a job holds those of the players it is between, not a pruned copy of the model.
        ablates = {
            mask: [
                (b, self._ablated_layers(b, mask & bits[b]))
                for b in range(n_blocks)
                if mask & bits[b]
            ]
            for mask in masks
        }
        uses = collections.Counter(
            (b, name) for mask in masks for b, names in ablates[mask] for name in names
        )

        def finish(mask: int, hidden: torch.Tensor) -> None:
            nll = self.model.sequence_nll(
                hidden,
                self.input_ids,
                reference=self._reference,
                reference_probs=self._reference_probs,
            )
            nll = float(nll.sum())
            now = time.perf_counter()
            on_result(mask, nll, self.n_tokens, now - clock[0])
            clock[0] = now
            progress.update(1)
            freed = False
            for b, names in ablates[mask]:
                for name in names:
                    uses[b, name] -= 1
                    if not uses[b, name] and name in self._pruned.get(b, {}):
                        del self._pruned[b][name]
                        freed = True
                if not self._pruned.get(b, True):
                    del self._pruned[b]
            if freed:
                return_freed_memory()

        def walk(index: int, box: list[torch.Tensor], group: list[int]) -> None:
            hidden = box.pop()
            while index < n_blocks:
                branches: dict[int, list[int]] = {}
                for mask in group:
                    branches.setdefault(mask & bits[index], []).append(mask)
                # The lowest state (the dense branch where there is one) goes on in this frame
                # and the others are walked first: a frame holds its hidden states while it
                # waits, which along the dense path of leave-one-out games would be one set per
                # block.
                (state, group), *others = sorted(branches.items())
                for other, members in others:
                    walk(index + 1, [self._forward(index, hidden, kwargs, other)], members)
                hidden = self._forward(index, hidden, kwargs, state)
                index += 1
            finish(group[0], hidden)

        hidden, kwargs = self.model.embed(self.input_ids)
        reference_forwards = 0
        if self.targets == "dense" and self._reference is None and self._reference_probs is None:
            self._reference = hidden
            for index in tqdm(range(n_blocks), desc="dense reference", unit="block", leave=False):
                self._reference = self._forward(index, self._reference, kwargs, 0)
            reference_forwards = n_blocks
            if self.n_tokens * self.model.vocab_size * 4 <= self.reference_cache_bytes:
                self._reference_probs = self.model.next_token_probs(self._reference, self.input_ids)
                self._reference = None
        box = [hidden]
        del hidden
        walk(0, box, masks)
        progress.close()
        return EvaluationStats(
            coalitions=len(masks),
            block_forwards=self.block_forwards,
            naive_block_forwards=reference_forwards + sum(self.naive_forwards(m) for m in masks),
            seconds=time.perf_counter() - start,
        )
