"""Dense calibration statistics and the probe masks that define the ``prune`` ablation.

Both come from the *dense* model: every block sees the inputs the unpruned model gives it, so the
statistics (and the masks and OWL outlier densities derived from them) do not depend on any
allocation and are computed once per (model, calibration) pair.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from tqdm.auto import tqdm

from svnup.io import atomic_path, open_h5
from svnup.kernels import LayerStats, magnitude_mask, wanda_mask
from svnup.models import BlockModel, linear_layers

PROBE_PRUNERS = ("wanda", "magnitude")

BlockStats = dict[str, torch.Tensor]
BlockMasks = dict[str, torch.Tensor]


@torch.no_grad()
def dense_statistics(model: BlockModel, calibration: torch.Tensor) -> list[BlockStats]:
    """Per block and linear layer, the sum over calibration tokens of each squared input feature."""
    hidden, kwargs = model.embed(calibration)
    result = []
    for index in tqdm(range(model.n_blocks), desc="dense statistics"):
        layers = linear_layers(model.blocks[index])
        stats = {
            name: LayerStats(layer.in_features, hessian=False, device=model.device)
            for name, layer in layers.items()
        }
        hooks = [
            layer.register_forward_hook(
                lambda module, args, output, s=stats[name]: s.add_batch(args[0])
            )
            for name, layer in layers.items()
        ]
        hidden = model.forward_block(index, hidden, kwargs)
        for hook in hooks:
            hook.remove()
        result.append({name: s.col_norm_sq.cpu() for name, s in stats.items()})
    return result


def probe_masks(
    model: BlockModel, stats: list[BlockStats], sparsity: float, pruner: str = "wanda"
) -> list[BlockMasks]:
    """The mask each block gets when it is ablated: ``pruner`` at ``sparsity``, from dense stats."""
    if pruner not in PROBE_PRUNERS:
        raise ValueError(
            f"probe pruner {pruner!r} is not one of {', '.join(PROBE_PRUNERS)} "
            "(the probe needs a mask from dense statistics alone)"
        )
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"probe sparsity {sparsity} must be in (0, 1)")
    masks = []
    for index, block in enumerate(model.blocks):
        block_masks = {}
        for name, layer in linear_layers(block).items():
            weight = layer.weight.data
            if pruner == "wanda":
                col = stats[index][name].to(weight.device)
                mask = wanda_mask(weight, col, sparsity)
            else:
                mask = magnitude_mask(weight, sparsity)
            block_masks[name] = mask.cpu()
        masks.append(block_masks)
    return masks


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
        ids = torch.from_numpy(f["input_ids"][()])
        blocks = f["blocks"]
        stats = [
            {name: torch.from_numpy(blocks[str(i)][name][()]) for name in blocks[str(i)]}
            for i in range(len(blocks))
        ]
        return ids, stats, json.loads(f.attrs["meta"])


def save_masks(path, masks: list[BlockMasks], attrs: dict) -> None:
    """HDF5 with bit-packed masks (one bit per weight, True = pruned)."""
    with atomic_path(path) as tmp, open_h5(tmp, "w") as f:
        for index, block in enumerate(masks):
            for name, mask in block.items():
                data = np.packbits(mask.numpy().reshape(-1))
                ds = f.create_dataset(f"blocks/{index}/{name}", data=data, compression="gzip")
                ds.attrs["shape"] = tuple(mask.shape)
        f.attrs["meta"] = json.dumps(attrs, sort_keys=True)


def load_masks(path, blocks: set[int] | None = None) -> tuple[dict[int, BlockMasks], dict]:
    """Masks of ``blocks`` (all by default) as bool tensors, and the file's metadata."""
    with open_h5(path, "r") as f:
        result = {}
        for key, group in f["blocks"].items():
            index = int(key)
            if blocks is not None and index not in blocks:
                continue
            result[index] = {}
            for name, ds in group.items():
                shape = tuple(ds.attrs["shape"])
                bits = np.unpackbits(ds[()], count=int(np.prod(shape)))
                result[index][name] = torch.from_numpy(bits.reshape(shape).astype(bool))
        return result, json.loads(f.attrs["meta"])
