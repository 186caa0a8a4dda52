"""Dense calibration statistics and the probes that define the ``prune`` ablation.

Both come from the *dense* model: every block sees the inputs the unpruned model gives it, so the
statistics (and the probes and OWL outlier densities derived from them) do not depend on any
allocation and are computed once per (model, calibration) pair.

A block's probe is what each of its linear layers becomes when the block is ablated: a mask (True =
pruned) for pruners that only zero weights (Wanda, magnitude), the updated weight for SparseGPT,
which also reconstructs the weights it keeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from svnup.io import atomic_path, open_h5, read_meta
from svnup.kernels import LayerStats, magnitude_mask, sparsegpt_prune, wanda_mask
from svnup.models import BlockKwargs, BlockModel, linear_layers, return_freed_memory

PROBE_PRUNERS = ("wanda", "magnitude", "sparsegpt")

BlockStats = dict[str, torch.Tensor]
BlockMasks = dict[str, torch.Tensor]
BlockProbe = dict[str, torch.Tensor]  # per layer: a bool mask (True = pruned) or the new weight


def block_statistics(
    model: BlockModel, index: int, hidden: torch.Tensor, kwargs: BlockKwargs, hessian: bool
) -> tuple[dict[str, LayerStats], torch.Tensor]:
    """Input statistics of block ``index``'s linear layers on ``hidden``, and the block's output."""
    layers = linear_layers(model.blocks[index])
    stats = {
        name: LayerStats(layer.in_features, hessian=hessian, device=model.device)
        for name, layer in layers.items()
    }
    hooks = [
        layer.register_forward_hook(lambda module, args, out, s=stats[name]: s.add_batch(args[0]))
        for name, layer in layers.items()
    ]
    try:
        hidden = model.forward_block(index, hidden, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return stats, hidden


@torch.no_grad()
def dense_statistics(model: BlockModel, calibration: torch.Tensor) -> list[BlockStats]:
    """Per block and linear layer, the sum over calibration tokens of each squared input feature."""
    hidden, kwargs = model.embed(calibration)
    result = []
    for index in tqdm(range(model.n_blocks), desc="dense statistics"):
        stats, hidden = block_statistics(model, index, hidden, kwargs, hessian=False)
        result.append({name: s.col_norm_sq.cpu() for name, s in stats.items()})
        return_freed_memory()
    return result


def _check_probe(sparsity: float, pruner: str) -> None:
    if pruner not in PROBE_PRUNERS:
        raise ValueError(f"probe pruner {pruner!r} is not one of {', '.join(PROBE_PRUNERS)}")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"probe sparsity {sparsity} must be in (0, 1)")


def probe_masks(
    model: BlockModel, stats: list[BlockStats], sparsity: float, pruner: str = "wanda"
) -> list[BlockMasks]:
    """The mask each block gets when it is ablated: ``pruner`` (Wanda or magnitude, which need no
    more than the dense column norms) at ``sparsity``."""
    return list(iter_probe_masks(model, stats, sparsity, pruner))


def iter_probe_masks(
    model: BlockModel, stats: list[BlockStats], sparsity: float, pruner: str = "wanda"
) -> Iterator[BlockMasks]:
    """``probe_masks`` one block at a time, so a probe is written as it is computed (the masks
    of a whole model take a quarter of its float32 weights)."""
    _check_probe(sparsity, pruner)
    if pruner == "sparsegpt":
        raise ValueError("a SparseGPT probe needs the calibration tokens: use sparsegpt_probe")
    for index, block in enumerate(tqdm(model.blocks, desc=f"{pruner} probe {sparsity:g}")):
        block_masks = {}
        for name, layer in linear_layers(block).items():
            weight = layer.weight.data
            if pruner == "wanda":
                col = stats[index][name].to(weight.device)
                mask = wanda_mask(weight, col, sparsity)
            else:
                mask = magnitude_mask(weight, sparsity)
            block_masks[name] = mask.cpu()
        return_freed_memory()
        yield block_masks


@torch.no_grad()
def sparsegpt_probe(
    model: BlockModel, calibration: torch.Tensor, sparsity: float
) -> Iterator[BlockProbe]:
    """Each block's SparseGPT weights at ``sparsity`` (in the model's dtype), from the Hessians of
    its *dense* inputs.

    With every other block dense, a block ablated alone sees exactly these inputs, so this is what
    SparseGPT would make of it in a leave-one-out coalition. Blocks are yielded one at a time so a
    large model's probe can be written as it is computed.
    """
    _check_probe(sparsity, "sparsegpt")
    hidden, kwargs = model.embed(calibration)
    for index in tqdm(range(model.n_blocks), desc=f"sparsegpt probe {sparsity:g}"):
        block = model.blocks[index]
        with model.on_device(block):
            stats, hidden = block_statistics(model, index, hidden, kwargs, hessian=True)
            probe = {}
            for name, layer in linear_layers(block).items():
                weight = sparsegpt_prune(layer.weight.data, stats[name].pop_hessian(), sparsity)[0]
                probe[name] = weight.cpu()
        return_freed_memory()
        yield probe


def save_statistics(path, calibration: torch.Tensor, stats: list[BlockStats], attrs: dict) -> None:
    """HDF5: the calibration token ids and every block's per-layer input statistics."""
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        f.create_dataset("input_ids", data=calibration.cpu().numpy().astype(np.int64))
        for index, block in enumerate(stats):
            group = f.create_group(f"blocks/{index}")
            for name, value in block.items():
                group.create_dataset(name, data=value.float().numpy())
        f.attrs["meta"] = json.dumps(attrs, sort_keys=True)


def load_statistics(path) -> tuple[torch.Tensor, list[BlockStats], dict]:
    with open_h5(path, "r") as f:
        meta = read_meta(f, path, datasets=("input_ids", "blocks"))
        ids = torch.from_numpy(f["input_ids"][()])
        blocks = f["blocks"]
        stats = [
            {name: torch.from_numpy(blocks[str(i)][name][()]) for name in blocks[str(i)]}
            for i in range(len(blocks))
        ]
        return ids, stats, meta


def save_probe(path, blocks: Iterable[BlockProbe], attrs: dict) -> None:
    """HDF5: each layer's mask bit-packed (one bit per weight, True = pruned) under ``blocks/``,
    and for a probe that rewrites weights the kept values (row-major) under ``values/``, in the
    weights' own dtype: the evaluator casts a probe to its layer's dtype anyway, so float32 would
    only double (bfloat16, float16) the largest intermediate of a SparseGPT game."""
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for index, block in enumerate(blocks):
            for name, tensor in block.items():
                mask = tensor if tensor.dtype == torch.bool else tensor == 0
                data = np.packbits(mask.numpy().reshape(-1))
                ds = f.create_dataset(f"blocks/{index}/{name}", data=data, compression="gzip")
                ds.attrs["shape"] = tuple(mask.shape)
                if tensor.dtype != torch.bool:
                    _write_values(f, f"values/{index}/{name}", tensor[~mask])
            del block
            return_freed_memory()
        f.attrs["meta"] = json.dumps(attrs, sort_keys=True)


def _write_values(f, name: str, values: torch.Tensor) -> None:
    """A 1-D tensor in its own dtype; bfloat16, which numpy lacks, as its 16 bits with a tag."""
    if values.dtype == torch.bfloat16:
        ds = f.create_dataset(name, data=values.view(torch.int16).numpy())
        ds.attrs["dtype"] = "bfloat16"
    else:
        f.create_dataset(name, data=values.numpy())


def _read_values(ds) -> torch.Tensor:
    """What ``_write_values`` wrote (float32 in files from before the dtype was kept)."""
    values = torch.from_numpy(ds[()])
    return values.view(torch.bfloat16) if ds.attrs.get("dtype") == "bfloat16" else values


def probe_shapes(path) -> list[dict[str, tuple[int, ...]]]:
    """Each block's {layer: weight shape} in a probe file, read without loading its masks."""
    with open_h5(path, "r") as f:
        group = f["blocks"]
        return [
            {name: tuple(int(n) for n in ds.attrs["shape"]) for name, ds in group[key].items()}
            for key in sorted(group, key=int)
        ]


def _read_block(f, key: str) -> BlockProbe:
    values = f.get(f"values/{key}")
    probe = {}
    for name, ds in f["blocks"][key].items():
        shape = tuple(ds.attrs["shape"])
        bits = np.unpackbits(ds[()], count=int(np.prod(shape)))
        mask = torch.from_numpy(bits.reshape(shape).astype(bool))
        if values is not None:
            kept = _read_values(values[name])
            weight = torch.zeros(shape, dtype=kept.dtype)
            weight[~mask] = kept
            probe[name] = weight
        else:
            probe[name] = mask
    return probe


def load_probe(path, blocks: set[int] | None = None) -> tuple[dict[int, BlockProbe], dict]:
    """The probes of ``blocks`` (all by default), and the file's metadata: bool masks, or the
    weights where the probe rewrote them (in the dtype they were stored in)."""
    with open_h5(path, "r") as f:
        result = {
            int(key): _read_block(f, key)
            for key in f["blocks"]
            if blocks is None or int(key) in blocks
        }
        return result, json.loads(f.attrs["meta"])


class ProbeFile(Mapping):
    """The probes of a file as a read-only mapping {block: probe}, each block read when it is
    asked for and not kept: a coalition job holds the probes of the blocks it is ablating, not
    a second copy of the model's weights."""

    def __init__(self, path) -> None:
        self.path = path
        with open_h5(path, "r") as f:
            self._blocks = sorted(int(key) for key in f["blocks"])

    def __getitem__(self, index: int) -> BlockProbe:
        if index not in self._blocks:
            raise KeyError(index)
        with open_h5(self.path, "r") as f:
            return _read_block(f, str(index))

    def __contains__(self, index: object) -> bool:
        return index in self._blocks  # Mapping's own would read the block's probe to answer

    def __iter__(self) -> Iterator[int]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)
