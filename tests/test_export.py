"""Export for reuse: the saved checkpoint loads with plain transformers, its sidecar says what
produced it, and the llm-compressor recipe reproduces the per-block allocation.

Why: a pruned model is only worth keeping if other tools can load it, and an allocation is only
portable if the recipe names the right modules in the right order with the fields llm-compressor
reads. llm-compressor itself is not installed in CI, so the recipe is checked against the fields
its modifiers declare and against its target-matching rule (an exact name matches one module).
"""

from __future__ import annotations

import inspect

import h5py
import pytest
import torch
import yaml
from workflow_fixture import build_project

from svnup import config as cfg
from svnup import export, stages
from svnup.io import read_json, write_scores
from svnup.kernels import sparsegpt_prune

# The pydantic fields of llm-compressor's one-shot sparsity modifiers
# (src/llmcompressor/modifiers/pruning/sparsegpt/sgpt_base.py: SparsityModifierBase, and
# sparsegpt/base.py: SparseGPTModifier), as of llm-compressor 0.14.
SPARSITY_MODIFIER_FIELDS = {
    "sparsity",
    "sparsity_profile",
    "mask_structure",
    "owl_m",
    "owl_lmbda",
    "sequential_update",
    "targets",
    "ignore",
}
DOCUMENTED = {
    "WandaPruningModifier": SPARSITY_MODIFIER_FIELDS,
    "SparseGPTModifier": SPARSITY_MODIFIER_FIELDS
    | {"block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians"},
}
N_LAYERS = 3
RUNTIME = {"device": "cpu", "batch_size": 4, "offload": "auto"}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict:
    """A tiny LLaMA pruned by the prune stage with a non-uniform SV-NUP budget."""
    root = build_project(tmp_path_factory.mktemp("export"), n_layers=N_LAYERS)
    model = {"path": str(root / "tiny"), "dtype": "float32"}
    calibration_spec = {
        "model": model,
        "seqlen": 32,
        "dataset": str(root / "data" / "train.jsonl"),
        "nsamples": 4,
        "seed": 0,
    }
    calibration = root / "calibration.h5"
    stages.calibrate(calibration_spec, RUNTIME, calibration)
    scores = root / "scores.json"
    write_scores(scores, [0.1, 0.9, 0.4])
    budget_spec = {"method": "svnup", "min": 0.0, "max": 0.99, "lambda": 0.2, "scores": "k"}
    budget = root / "budget.json"
    stages.budget(budget_spec, 0.5, calibration, scores, budget)
    prune_spec = {"budget": cfg.key(budget_spec), "sparsity": 0.5, "pruner": "wanda"}
    out = root / "model"
    stages.prune(prune_spec, RUNTIME, model, budget, calibration, out, root / "prune.json")
    return {
        "root": root,
        "out": out,
        "plan": read_json(budget),
        "model": model,
        "calibration_spec": calibration_spec,
        "prune_spec": prune_spec,
    }


def block_sparsity(model, index: int) -> float:
    layers = [m for m in model.model.layers[index].modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    return zeros / sum(layer.weight.numel() for layer in layers)


def test_checkpoint_loads_with_plain_transformers(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pruned["out"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    sidecar = read_json(out / export.SIDECAR)
    for index in range(N_LAYERS):
        assert block_sparsity(model, index) == pytest.approx(
            sidecar["measured_block_sparsity"][index], abs=1e-9
        )
        assert block_sparsity(model, index) == pytest.approx(
            pruned["plan"]["sparsities"][index], abs=0.02
        )
    ids = tokenizer("Return the value.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_sidecar_records_allocation_and_provenance(pruned):
    sidecar = read_json(pruned["out"] / export.SIDECAR)
    plan = pruned["plan"]
    assert len(set(plan["sparsities"])) == N_LAYERS, "the test needs a non-uniform budget"
    assert sidecar["block_sparsity"] == plan["sparsities"]
    assert sidecar["allocation"] == "svnup" and sidecar["pruner"] == "wanda"
    assert sidecar["target_sparsity"] == 0.5
    assert sidecar["achieved_sparsity"] == pytest.approx(0.5)
    assert sidecar["blocks"] == [f"model.layers.{i}" for i in range(N_LAYERS)]
    assert sidecar["model"] == pruned["model"]
    assert sidecar["specs"] == {
        "prune": pruned["prune_spec"],
        "budget": plan["spec"],
        "calibration": pruned["calibration_spec"],
    }
    assert sidecar["versions"]["transformers"] and sidecar["versions"]["torch"]
    assert sidecar["llm_compressor_recipe"] == export.RECIPE


def check_recipe_shape(text: str, model) -> dict:
    """The one modifier of a recipe as llm-compressor reads it; fails on anything it would not
    read the way svnup means it."""
    recipe = yaml.safe_load(text)
    ((stage, groups),) = recipe.items()
    assert stage.endswith("_stage")  # Recipe.from_dict only reads *_stage / *_modifiers keys
    ((group, modifiers),) = groups.items()
    assert group.endswith("_modifiers")
    ((name, arguments),) = modifiers.items()
    assert set(arguments) <= DOCUMENTED[name], set(arguments) - DOCUMENTED[name]
    assert arguments["ignore"] == ["lm_head"]
    assert len(arguments["sparsity"]) == len(arguments["targets"])
    # Exact-name targets each match one module; llm-compressor takes them in model order.
    modules = [module_name for module_name, _ in model.named_modules()]
    assert all(target in modules for target in arguments["targets"])
    assert sorted(arguments["targets"], key=modules.index) == arguments["targets"]
    return {"name": name, **arguments}


def test_recipe_reproduces_the_allocation(pruned):
    from transformers import AutoModelForCausalLM

    text = (pruned["out"] / export.RECIPE).read_text()
    assert text.startswith("# llm-compressor recipe written by svnup")
    model = AutoModelForCausalLM.from_pretrained(pruned["out"])
    modifier = check_recipe_shape(text, model)
    assert modifier["name"] == "WandaPruningModifier"
    assert modifier["mask_structure"] == "0:0"
    blocks = dict(model.named_modules())
    assert [blocks[t] for t in modifier["targets"]] == list(model.model.layers)
    assert modifier["sparsity"] == pytest.approx(pruned["plan"]["sparsities"], abs=1e-6)


def test_recipe_stage_needs_only_the_budget(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    budget = pruned["root"] / "budget.json"
    stages.recipe(budget, "sparsegpt", pruned["model"], tmp_path / "recipe.yaml")
    model = AutoModelForCausalLM.from_pretrained(pruned["out"])
    modifier = check_recipe_shape((tmp_path / "recipe.yaml").read_text(), model)
    assert modifier["name"] == "SparseGPTModifier"
    assert modifier["sparsity"] == pytest.approx(pruned["plan"]["sparsities"], abs=1e-6)
    defaults = inspect.signature(sparsegpt_prune).parameters
    assert modifier["block_size"] == defaults["blocksize"].default
    assert modifier["dampening_frac"] == defaults["percdamp"].default


def test_semi_structured_and_magnitude():
    blocks = export.block_names("model.layers", 2)
    text = export.recipe_text(export.recipe("wanda", [0.5, 0.5], blocks, nm="2:4"), ["header"])
    arguments = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]
    # Unquoted, YAML 1.1 (PyYAML, as llm-compressor loads recipes) would read 2:4 as 124.
    assert arguments["WandaPruningModifier"]["mask_structure"] == "2:4"
    with pytest.raises(ValueError, match="MagnitudePruningModifier"):
        export.recipe("magnitude", [0.5, 0.5], blocks)
    with pytest.raises(ValueError, match="3 sparsities for 2 blocks"):
        export.recipe("wanda", [0.5, 0.5, 0.5], blocks)


def test_magnitude_checkpoint_says_why_it_has_no_recipe(tmp_path):
    plan = {"spec": {"method": "uniform"}, "target": 0.5, "achieved": 0.5, "sparsities": [0.5]}
    export.describe_checkpoint(
        tmp_path,
        plan=plan,
        prune_spec={"pruner": "magnitude"},
        model={"path": "m", "dtype": "float32"},
        calibration_spec={},
        blocks=["model.layers.0"],
        measured=[0.5],
        identity={"checkpoint_id": "0123456789ab", "made_from": {}},
        versions={},
    )
    sidecar = read_json(tmp_path / export.SIDECAR)
    assert sidecar["llm_compressor_recipe"] is None
    assert "MagnitudePruningModifier" in sidecar["llm_compressor_note"]
    assert not (tmp_path / export.RECIPE).exists()


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_pruned_layers_evaluate_as_the_checkpoint_on_a_fraction_of_its_disk(pruned, pruner):
    """With save_model off a run keeps only its pruned layers until it is evaluated: loaded onto
    the dense model (in place or block by block) they give the checkpoint's perplexity to the
    bit, with the same identity, and their file holds what the probe formula of
    benchmarks/results/scale.md counts: a bit a weight, plus each kept weight once in the model's
    dtype where the pruner rewrites them."""
    from svnup.content import PRUNED_LAYERS

    root, model = pruned["root"], pruned["model"]
    spec = {**pruned["prune_spec"], "pruner": pruner}
    evaluation = {"dataset": str(root / "data" / "heldout.jsonl"), "split": "test", "seqlen": 32}
    results = {}
    for layers_only in (False, True):
        out = root / f"{pruner}-layers-{layers_only}"
        report = out.with_suffix(".json")
        inputs = (root / "budget.json", root / "calibration.h5")
        stages.prune(spec, RUNTIME, model, *inputs, out, report, layers_only=layers_only)
        stages.evaluate(evaluation, RUNTIME, model, str(out), out.with_suffix(".ppl.json"))
        results[layers_only] = read_json(out.with_suffix(".ppl.json"))
    assert results[True]["ppl"] == results[False]["ppl"]
    assert results[True]["checkpoint_id"] == results[False]["checkpoint_id"]
    offloaded = root / f"{pruner}-offloaded.ppl.json"  # blocks moved to the device one at a time
    layers = root / f"{pruner}-layers-True"
    stages.evaluate(evaluation, {**RUNTIME, "offload": True}, model, str(layers), offloaded)
    assert read_json(offloaded)["ppl"] == results[False]["ppl"]

    assert sorted(p.name for p in layers.iterdir()) == sorted(
        [PRUNED_LAYERS, export.SIDECAR, *([export.RECIPE] if pruner in export.MODIFIERS else [])]
    )
    from safetensors.torch import load_file

    checkpoint = load_file(root / f"{pruner}-layers-False" / "model.safetensors")
    with h5py.File(layers / PRUNED_LAYERS) as f:
        assert ("values" in f) == (pruner == "sparsegpt")
        for block in f["blocks"]:
            for name, bits in f["blocks"][block].items():
                weight = checkpoint[f"model.layers.{block}.{name}.weight"]
                assert bits.size == -(-weight.numel() // 8)  # a bit a weight
                if pruner == "sparsegpt":  # and each kept weight once, in the model's dtype
                    kept = f["values"][block][name]
                    assert kept.shape == (int((weight != 0).sum()),) and kept.dtype == "float32"
