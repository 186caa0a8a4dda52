"""Export an allocation for reuse: a provenance sidecar and an llm-compressor recipe.

A pruned checkpoint saved by the prune stage is a plain Hugging Face directory; ``svnup.json``
beside its weights says what produced it (per-block sparsities, allocation, pruner, calibration,
versions). ``recipe.yaml`` hands the allocation to vllm-project/llm-compressor, whose
``SparseGPTModifier`` and ``WandaPruningModifier`` take one sparsity per target module: the
targets are the decoder blocks by name (an exact name matches exactly one module there), in
model order, so ``sparsity[i]`` is block i's sparsity; an allocation that sets each linear
layer (``shapley.players: halves``) names each linear layer instead. The recipe reproduces the
allocation; the weights llm-compressor then computes depend on its own calibration data and
kernels.

Magnitude pruning has no recipe: llm-compressor's ``MagnitudePruningModifier`` is a gradual,
training-time modifier (``init_sparsity`` -> ``final_sparsity`` on a schedule, one sparsity per
modifier), not a one-shot pruner that takes a per-block list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from svnup.io import atomic_path, write_json

SIDECAR = "svnup.json"
RECIPE = "recipe.yaml"
# svnup pruner -> llm-compressor one-shot modifier, with the settings that match svnup's kernel
# (SparseGPT: lazy blocks of 128 columns, dampening 1% of the mean Hessian diagonal).
MODIFIERS: dict[str, tuple[str, dict]] = {
    "sparsegpt": ("SparseGPTModifier", {"block_size": 128, "dampening_frac": 0.01}),
    "wanda": ("WandaPruningModifier", {}),
}
NO_RECIPE = {
    "magnitude": (
        "llm-compressor's MagnitudePruningModifier is a gradual training-time modifier with one "
        "final_sparsity, not a one-shot pruner taking per-block sparsities; no recipe is written"
    ),
}


def block_names(blocks_path: str, n_blocks: int) -> list[str]:
    """Module names of the decoder blocks, e.g. ``model.layers.0`` ... for a LLaMA."""
    return [f"{blocks_path}.{index}" for index in range(n_blocks)]


def recipe_targets(plan: dict, blocks: Sequence[str]) -> tuple[list[float], list[str]]:
    """(sparsities, target modules) of a budget: one per block, or one per linear layer where
    the budget sets layers."""
    if "layer_sparsities" not in plan:
        return list(plan["sparsities"]), list(blocks)
    pairs = [
        (sparsity, f"{block}.{layer}")
        for block, layers in zip(blocks, plan["layer_sparsities"], strict=True)
        for layer, sparsity in layers.items()
    ]
    return [s for s, _ in pairs], [t for _, t in pairs]


def recipe(
    pruner: str, sparsities: Sequence[float], blocks: Sequence[str], nm: str | None = None
) -> dict:
    """The llm-compressor recipe that prunes module ``blocks[i]`` (a block, or a linear layer)
    to ``sparsities[i]``.

    ``nm`` ("2:4") asks for semi-structured masks (``mask_structure``); "0:0" is unstructured.
    """
    if pruner not in MODIFIERS:
        reason = NO_RECIPE.get(pruner, f"pruner {pruner!r} has no llm-compressor modifier")
        raise ValueError(reason)
    if len(sparsities) != len(blocks):
        raise ValueError(f"{len(sparsities)} sparsities for {len(blocks)} blocks")
    modifier, settings = MODIFIERS[pruner]
    arguments = {
        "sparsity": [round(float(s), 6) for s in sparsities],
        "targets": list(blocks),
        "ignore": ["lm_head"],
        "mask_structure": nm or "0:0",
        **settings,
    }
    return {"sparsity_stage": {"sparsity_modifiers": {modifier: arguments}}}


def recipe_text(recipe_dict: dict, header: Sequence[str]) -> str:
    """The recipe as YAML, after ``header`` lines written as comments."""
    import yaml

    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(recipe_dict, sort_keys=False, default_flow_style=None)


def write_recipe(path: str | Path, recipe_dict: dict, header: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(recipe_text(recipe_dict, header))


def recipe_header(plan: dict, pruner: str, model_path: str, version: str) -> list[str]:
    return [
        f"llm-compressor recipe written by svnup {version}: the {plan['spec']['method']} "
        f"allocation of {model_path}",
        f"at target sparsity {plan['target']} (parameter-weighted mean {plan['achieved']:.6f}), "
        f"pruned with {pruner}; sparsity[i] applies to targets[i].",
        "Apply with llmcompressor.oneshot(model=..., dataset=..., recipe=<this file>).",
    ]


def describe_checkpoint(
    folder: str | Path,
    *,
    plan: dict,
    prune_spec: dict,
    model: dict,
    calibration_spec: dict,
    blocks: Sequence[str],
    measured: Sequence[float],
    identity: dict,
    versions: dict,
) -> None:
    """Write ``svnup.json`` (with the checkpoint's identity, svnup.provenance) and, where the
    pruner has a modifier, ``recipe.yaml`` into a saved checkpoint ``folder``."""
    folder = Path(folder)
    pruner = prune_spec["pruner"]
    sidecar = {
        **identity,
        "model": model,
        "allocation": plan["spec"]["method"],
        "target_sparsity": plan["target"],
        "achieved_sparsity": plan["achieved"],
        "pruner": pruner,
        "blocks": list(blocks),
        "block_sparsity": plan["sparsities"],
        "layer_sparsity": plan.get("layer_sparsities"),
        "measured_block_sparsity": list(measured),
        "importance": plan.get("importance"),
        "specs": {"prune": prune_spec, "budget": plan["spec"], "calibration": calibration_spec},
        "llm_compressor_recipe": None,
        "versions": versions,
    }
    if pruner in MODIFIERS:
        header = recipe_header(plan, pruner, model["path"], versions.get("svnup", "?"))
        nm = prune_spec.get("nm")
        targets = recipe_targets(plan, blocks)
        write_recipe(folder / RECIPE, recipe(pruner, *targets, nm), header)
        sidecar["llm_compressor_recipe"] = RECIPE
    else:
        sidecar["llm_compressor_note"] = NO_RECIPE.get(pruner, "no llm-compressor modifier")
    write_json(folder / SIDECAR, sidecar)
