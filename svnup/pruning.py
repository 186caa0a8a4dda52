"""Sequential block-by-block pruning with a per-block sparsity.

The standard protocol of SparseGPT and Wanda: calibration inputs enter block 0; each block collects
its layers' input statistics from inputs that already went through the pruned earlier blocks, is
pruned, and then produces the inputs of the next block. The allocation (one sparsity per block, or
per linear layer) is decided elsewhere; this module is the unchanged pruner it feeds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from svnup.calibration import ProbeFile, block_statistics
from svnup.io import corrupt
from svnup.kernels import LayerStats, magnitude_mask, parse_nm, sparsegpt_prune, wanda_mask
from svnup.models import BlockModel, linear_layers, return_freed_memory
from svnup.registry import PRUNERS, choices, resolve


@dataclass
class LayerReport:
    name: str
    sparsity: float
    relative_error: float


@dataclass
class BlockReport:
    block: int
    target: float
    sparsity: float
    seconds: float
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_sparsities(sparsities: Sequence[float], n_blocks: int) -> list[float]:
    """Validate a per-block sparsity list before any expensive work."""
    values = [float(s) for s in sparsities]
    if len(values) != n_blocks:
        raise ValueError(f"got {len(values)} block sparsities for a model with {n_blocks} blocks")
    bad = [s for s in values if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"block sparsity {bad[0]} is outside [0, 1); every block needs 0 <= s < 1")
    return values


def check_layer_sparsities(
    layer_sparsities: Sequence[dict[str, float]], model: BlockModel
) -> list[dict[str, float]]:
    """Validate per-layer sparsities ({layer: sparsity} per block) before any expensive work."""
    if len(layer_sparsities) != model.n_blocks:
        raise ValueError(
            f"got layer sparsities for {len(layer_sparsities)} blocks, the model has "
            f"{model.n_blocks}"
        )
    checked = []
    for index, (given, block) in enumerate(zip(layer_sparsities, model.blocks, strict=True)):
        names = set(linear_layers(block))
        if set(given) != names:
            raise ValueError(
                f"block {index}: layer sparsities name {sorted(given)}, its linear layers are "
                f"{sorted(names)}"
            )
        checked.append(dict(zip(given, check_sparsities(given.values(), len(given)), strict=True)))
    return checked


ERROR_SEQUENCES = 8


def _add_error_hooks(
    layers: dict[str, nn.Linear],
    dense: dict[str, torch.Tensor],
    sums: dict[str, list[float]],
    max_tokens: int,
) -> list:
    """Accumulate ||W x - W' x||^2 and ||W x||^2 for each layer on its first ``max_tokens``
    input tokens: a report, so it need not cost a whole extra pass over the calibration set."""

    def hook(name):
        def accumulate(module, args, output):
            left = max_tokens - sums[name][2]
            if left <= 0:
                return
            x = args[0].reshape(-1, module.in_features)[:left].float()
            pruned = output.reshape(-1, module.out_features)[:left].float()
            if module.bias is not None:
                pruned = pruned - module.bias.float()
            ref = x @ dense[name].float().T
            sums[name][0] += float((ref - pruned).pow(2).sum())
            sums[name][1] += float(ref.pow(2).sum())
            sums[name][2] += x.shape[0]

        return accumulate

    return [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]


def prune_magnitude(layer: nn.Linear, stats: None, sparsity: float, nm) -> None:
    layer.weight.data.masked_fill_(magnitude_mask(layer.weight.data, sparsity, nm), 0)


def prune_wanda(layer: nn.Linear, stats: LayerStats, sparsity: float, nm) -> None:
    weight = layer.weight.data
    weight.masked_fill_(wanda_mask(weight, stats.col_norm_sq, sparsity, nm), 0)


def prune_sparsegpt(layer: nn.Linear, stats: LayerStats, sparsity: float, nm) -> None:
    # The kernel factorises the Hessian in place; popping it lets that buffer go at once.
    new_weight, _ = sparsegpt_prune(layer.weight.data, stats.pop_hessian(), sparsity, nm)
    layer.weight.data.copy_(new_weight)


def prune_model(
    model: BlockModel,
    calibration: torch.Tensor,
    sparsities: Sequence[float],
    method: str = "wanda",
    nm: str | None = None,
    layer_sparsities: Sequence[dict[str, float]] | None = None,
) -> list[BlockReport]:
    """Prune every linear layer of block b to ``sparsities[b]`` with ``method``, in place, or
    each layer to its own sparsity ``layer_sparsities[b][layer]`` where those are given
    (``sparsities`` is then each block's mean, reported as its target).

    ``calibration`` holds token ids [n, seqlen]. ``nm`` ("2:4", "4:8") asks for semi-structured
    masks, which only make sense with a uniform sparsity of n/m.
    """
    return _prune(model, calibration, sparsities, method, nm, layer_sparsities)[0]


def prune_and_score(
    model: BlockModel, calibration: torch.Tensor, sparsities: Sequence[float], method: str
) -> float:
    """Prune in place, then return the pruned model's mean next-token NLL on ``calibration``,
    read from the hidden states the sequential pass has already produced (no extra forward)."""
    _, hidden = _prune(model, calibration, sparsities, method, None)
    n, seqlen = calibration.shape
    return float(model.sequence_nll(hidden, calibration).sum()) / (n * (seqlen - 1))


@torch.no_grad()
def _prune(
    model: BlockModel,
    calibration: torch.Tensor,
    sparsities: Sequence[float],
    method: str,
    nm: str | None,
    layer_sparsities: Sequence[dict[str, float]] | None = None,
) -> tuple[list[BlockReport], torch.Tensor]:
    if method not in PRUNERS:
        raise ValueError(f"unknown pruner {method!r}; choose one of {choices(PRUNERS)}")
    pruner = PRUNERS[method]
    prune_layer = resolve(pruner.kernel)
    targets = check_sparsities(sparsities, model.n_blocks)
    if layer_sparsities is None:
        per_layer = [
            dict.fromkeys(linear_layers(b), s) for b, s in zip(model.blocks, targets, strict=True)
        ]
    else:
        per_layer = check_layer_sparsities(layer_sparsities, model)
    pattern = parse_nm(nm)
    every = [s for block in per_layer for s in block.values()]
    if pattern and any(abs(s - pattern[0] / pattern[1]) > 1e-9 for s in every):
        raise ValueError(f"nm={nm} needs a uniform sparsity of {pattern[0] / pattern[1]}")
    hidden, kwargs = model.embed(calibration)
    reports = []
    for index in tqdm(range(model.n_blocks), desc=f"prune {method}"):
        start = time.perf_counter()
        block = model.blocks[index]
        with model.on_device(block, write=True):
            layers = linear_layers(block)
            layer_targets = per_layer[index]
            stats = None
            if pruner.statistics is not None and max(layer_targets.values()) > 0:
                hessian = pruner.statistics == "hessian"
                stats, _ = block_statistics(model, index, hidden, kwargs, hessian=hessian)
            dense = {name: layer.weight.data.clone() for name, layer in layers.items()}
            for name, layer in layers.items():
                if layer_targets[name] > 0:
                    layer_stats = stats[name] if stats else None
                    prune_layer(layer, layer_stats, layer_targets[name], pattern)
            del stats
            sums = {name: [0.0, 0.0, 0] for name in layers}
            max_tokens = ERROR_SEQUENCES * calibration.shape[1]
            hooks = _add_error_hooks(layers, dense, sums, max_tokens)
            hidden = model.forward_block(index, hidden, kwargs)
            for hook in hooks:
                hook.remove()
        reports.append(_block_report(index, targets[index], layers, sums, start))
        return_freed_memory()
    return reports, hidden


def pruned_layers(model: BlockModel, pruner: str) -> Iterator[dict[str, torch.Tensor]]:
    """Each block's pruned linear layers as ``svnup.calibration.save_probe`` stores a probe: the
    weights where ``pruner`` rewrites the ones it keeps, else only which it zeroed. Against the
    dense model that is the whole pruned checkpoint, at a fraction of its disk (a bit a weight,
    plus the kept weights for SparseGPT)."""
    rewrites = PRUNERS[pruner].rewrites
    for block in model.blocks:
        layers = linear_layers(block).items()
        yield {
            name: (layer.weight.data if rewrites else layer.weight.data == 0).cpu()
            for name, layer in layers
        }


@torch.no_grad()
def apply_pruned_layers(model: BlockModel, path: str | Path) -> None:
    """Turn the dense ``model`` into the pruned one whose layers ``pruned_layers`` wrote to
    ``path``: zero the masked weights, or take the stored weights where the pruner rewrote them."""
    stored = ProbeFile(path)
    if len(stored) != model.n_blocks:
        raise corrupt(path, f"{len(stored)} blocks for the {model.n_blocks} of the model")
    for index in tqdm(range(model.n_blocks), desc="pruned layers"):
        block = model.blocks[index]
        saved = stored[index]
        with model.on_device(block, write=True):
            for name, layer in linear_layers(block).items():
                weight = layer.weight.data
                if name not in saved or tuple(saved[name].shape) != tuple(weight.shape):
                    raise corrupt(path, f"its block {index} {name} is not the model's layer")
                value = saved[name].to(weight.device)
                if value.dtype == torch.bool:
                    weight.masked_fill_(value, 0)
                else:
                    weight.copy_(value)
        del saved
        return_freed_memory()


def _block_report(index, target, layers, sums, start) -> BlockReport:
    layer_reports = [
        LayerReport(
            name=name,
            sparsity=float((layer.weight == 0).float().mean()),
            relative_error=sums[name][0] / max(sums[name][1], 1e-30),
        )
        for name, layer in layers.items()
    ]
    zeros = sum(float((layer.weight == 0).sum()) for layer in layers.values())
    total = sum(layer.weight.numel() for layer in layers.values())
    return BlockReport(
        block=index,
        target=target,
        sparsity=zeros / total,
        seconds=time.perf_counter() - start,
        layers=layer_reports,
    )
