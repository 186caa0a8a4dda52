"""Every number can be trusted: no stale or mismatched numbers, an explicit evaluation protocol,
and N:M pruning from the config.

The workflow tests run the real snakemake on a tiny project of their own (module scope, a run with
the non-uniform OWL allocation, whose budget needs no coalition games); each test leaves the
project as it found it. The other tests check the same rules on the functions the stages call.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import C4_LLAMA, PTB, needs_shared
from workflow_fixture import build_project, planned_jobs, snakemake, tiny_config, write_config

from svnup import config as cfg
from svnup import provenance, stages
from svnup.cli import main
from svnup.io import CorruptFileError, read_json, write_json
from svnup.registry import PRUNERS

RUN = "results/tiny/s0.5/owl/wanda/ppl.json"
DENSE = "results/tiny/dense/ppl.json"


def trust_config(**overrides) -> dict:
    return tiny_config(
        **{"save_model": False, "targets.allocations": ["owl"], "allocation.method": "owl"}
        | overrides
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = build_project(tmp_path_factory.mktemp("trust"))
    write_config(root, trust_config())
    snakemake(root, "--cores", "2", RUN, DENSE)
    return root


def _json(root: Path, path: str | Path):
    return json.loads((root / path).read_text())


def _budget(root: Path) -> Path:
    (path,) = root.glob("results/tiny/budget/owl/*/s0.5.json")
    return path


def _run_folder(root: Path) -> Path:
    (report,) = root.glob("results/tiny/runs/owl/s0.5/wanda/*/prune.json")
    return report.parent


def _one_line_error(root: Path, *args: str) -> str:
    result = snakemake(root, *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    return output.strip().splitlines()[-1]


# --- 1. no number can be stale or mismatched ------------------------------------------------


def test_every_number_of_a_run_names_one_checkpoint(project):
    run = _json(project, RUN)
    folder = _run_folder(project)
    report = _json(project, folder / "prune.json")
    assert run["checkpoint_id"] == report["checkpoint_id"]
    assert {e["checkpoint_id"] for e in run["evaluations"].values()} == {report["checkpoint_id"]}
    made_from = report["made_from"]
    assert made_from["budget"] == provenance.file_digest(_budget(project))
    assert made_from["prune"] == folder.name  # the run folder's key is the prune spec's
    dense = _json(project, DENSE)
    (dense_folder,) = project.glob("results/tiny/runs/dense/*")
    assert dense["checkpoint_id"] == dense_folder.name != run["checkpoint_id"]


def _edit_budget(root: Path, edit) -> dict:
    path = _budget(root)
    plan = json.loads(path.read_text())
    edited = edit(dict(plan))
    path.write_text(json.dumps(edited, indent=2) if isinstance(edited, dict | list) else edited)
    return plan


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda plan: {**plan, "sparsities": [0.9] * 6},
            "its parameter-weighted mean sparsity 0.9 is not its target 0.5",
        ),
        (lambda plan: {}, "no spec, target, achieved, sparsities, block_params"),
    ],
    ids=["every-block-at-0.9", "empty"],
)
def test_budget_that_is_no_allocation_is_refused_before_planning(project, tmp_path, edit, message):
    path = _budget(project)
    shutil.copy2(path, tmp_path / path.name)
    try:
        _edit_budget(project, edit)
        line = _one_line_error(project, "--dry-run", RUN)
        assert line.startswith(f"svnup: {path.relative_to(project)} is not a valid budget")
        assert message in line and "delete it and re-run snakemake" in line, line
    finally:
        shutil.copy2(tmp_path / path.name, path)
    assert planned_jobs(project, RUN) == {}


def _swap_first_blocks(plan: dict) -> dict:
    sparsities = list(plan["sparsities"])
    sparsities[0], sparsities[1] = sparsities[1], sparsities[0]
    assert sparsities != plan["sparsities"], "the test needs a non-uniform budget"
    return {**plan, "sparsities": sparsities}


def test_edited_budget_reruns_its_run_and_restoring_it_finds_its_numbers(project, tmp_path):
    """A budget edited in place that is still an allocation (two blocks swapped) re-prunes and
    re-evaluates; restoring it without a newer time is named, and once touched the run's
    first numbers come back."""
    path = _budget(project)
    shutil.copy2(path, tmp_path / path.name)
    first = _json(project, RUN)
    try:
        _edit_budget(project, _swap_first_blocks)
        assert planned_jobs(project, RUN) == {"prune": 1, "evaluate": 1, "collect": 1}
        snakemake(project, "--cores", "2", RUN)
        swapped = _json(project, RUN)
        assert swapped["budget"]["sparsities"] == json.loads(path.read_text())["sparsities"]
        assert swapped["pruning"]["block_sparsity"] == pytest.approx(
            swapped["budget"]["sparsities"], abs=0.02
        )
        assert swapped["checkpoint_id"] != first["checkpoint_id"]
        (evaluation,) = swapped["evaluations"].values()
        assert evaluation["checkpoint_id"] == swapped["checkpoint_id"]
        assert swapped["perplexity"] != first["perplexity"]

        shutil.copy2(tmp_path / path.name, path)  # the first content, and its first time
        line = _one_line_error(project, "--dry-run", RUN)
        assert f"{path.relative_to(project)} is not the budget" in line and "touch" in line
    finally:
        shutil.copy2(tmp_path / path.name, path)
    path.touch()
    assert planned_jobs(project, RUN) == {"prune": 1, "evaluate": 1, "collect": 1}
    snakemake(project, "--cores", "2", RUN)
    restored = _json(project, RUN)
    assert restored["checkpoint_id"] == first["checkpoint_id"]
    assert restored["perplexity"] == first["perplexity"]


def test_evaluation_of_another_checkpoint_is_measured_again(project):
    """An evaluation on disk that was measured on another checkpoint than the current files make
    is planned again, even though pruning again alone would leave it alone."""
    (evaluation,) = _run_folder(project).glob("eval/*.json")
    result = json.loads(evaluation.read_text())
    write_json(evaluation, {**result, "checkpoint_id": "0123456789ab"})  # a stale evaluation
    assert planned_jobs(project, RUN) == {"prune": 1, "evaluate": 1, "collect": 1}
    snakemake(project, "--cores", "2", RUN)
    assert json.loads(evaluation.read_text())["checkpoint_id"] == result["checkpoint_id"]
    assert _json(project, RUN)["perplexity"] == {result["dataset"]: result["ppl"]}


def test_added_dataset_keeps_finished_evaluations_of_the_same_checkpoint(project):
    """The reason the prune report is an ancient input: re-pruning a temporary checkpoint for a
    new dataset re-runs no finished evaluation, and the re-made checkpoint is the same one."""
    extra = project / "data/extra.jsonl"
    extra.write_text("".join((project / "data/heldout.jsonl").open().readlines()[:40]))
    first = _json(project, RUN)
    datasets = ["data/heldout.jsonl", "data/extra.jsonl"]
    write_config(project, trust_config(**{"evaluation.datasets": datasets}))
    try:
        assert planned_jobs(project, RUN) == {"prune": 1, "evaluate": 1, "collect": 1}
        snakemake(project, "--cores", "2", RUN)
        run = _json(project, RUN)
        assert run["checkpoint_id"] == first["checkpoint_id"]
        assert run["perplexity"]["data/heldout.jsonl"] == first["perplexity"]["data/heldout.jsonl"]
    finally:
        write_config(project, trust_config())
    assert "evaluate" not in planned_jobs(project, RUN)


def _plan(budget_path: Path, **plan) -> Path:
    base = {
        "spec": {"method": "owl", "min": 0.0, "max": 0.99},
        "target": 0.5,
        "achieved": 0.5,
        "sparsities": [0.4, 0.6, 0.5],
        "block_params": [10, 10, 20],
        "importance": None,
        "scores": {},
    }
    write_json(budget_path, {**base, **plan})
    return budget_path


HALVES = [
    {"block": b, "layers": [f"{half}.w"], "params": n, "name": f"{b}.{half}"}
    for b in range(3)
    for half, n in (("self_attn", 4), ("mlp", 6 if b < 2 else 16))
]


def _halves(sparsities: list[float]) -> dict:
    """A budget per half-block player whose block and layer entries agree with ``sparsities``."""
    params = [p["params"] for p in HALVES]
    blocks = [
        (sparsities[2 * b] * params[2 * b] + sparsities[2 * b + 1] * params[2 * b + 1])
        / (params[2 * b] + params[2 * b + 1])
        for b in range(3)
    ]
    layers = [{"self_attn.w": sparsities[2 * b], "mlp.w": sparsities[2 * b + 1]} for b in range(3)]
    mean = sum(s * p for s, p in zip(sparsities, params, strict=True)) / sum(params)
    return {
        "sparsities": blocks,
        "players": HALVES,
        "player_sparsities": sparsities,
        "layer_sparsities": layers,
        "target": mean,
        "achieved": mean,
    }


def test_budget_checks_each_entry(tmp_path):
    path = tmp_path / "s0.5.json"
    assert provenance.read_budget(_plan(path), target=0.5)["sparsities"] == [0.4, 0.6, 0.5]
    halves = _halves([0.3, 0.5, 0.6, 0.5, 0.45, 0.55])
    provenance.read_budget(_plan(path, **halves))
    cases = [
        ({"sparsities": [0.4, 0.6, 1.0]}, r"block sparsity 1.0 is outside \[0, 1\)"),
        ({"sparsities": [0.6, 0.6, 0.5]}, "mean sparsity 0.55 is not its target 0.5"),
        ({"achieved": 0.6}, "is not its achieved 0.6"),
        ({"block_params": [10, 10]}, "not a list of 2"),
        ({"spec": {}}, "names no allocation method"),
        ({**halves, "player_sparsities": halves["player_sparsities"][:5]}, "not 6 sparsities"),
        ({**halves, "layer_sparsities": halves["layer_sparsities"][::-1]}, "not its players'"),
        ({**halves, "block_params": [5, 5, 10]}, "do not add up to block_params"),
        (
            {**halves, "sparsities": [s + 0.01 for s in halves["sparsities"]]},
            "mean sparsity",
        ),
        ({"player_sparsities": [0.5]}, "player_sparsities without players"),
    ]
    for change, message in cases:
        with pytest.raises(CorruptFileError, match=message):
            provenance.read_budget(_plan(path, **change))
    with pytest.raises(CorruptFileError, match="its target is 0.5, not the run's 0.6"):
        provenance.read_budget(_plan(path), target=0.6)
    with pytest.raises(CorruptFileError, match="its spec has key"):
        provenance.read_budget(_plan(path), spec_key="000000000000")
    path.write_text("[]")
    with pytest.raises(CorruptFileError, match="a JSON list, not an object"):
        provenance.read_budget(path)


def test_collect_refuses_a_budget_that_changed_since_pruning(tmp_path):
    budget = _plan(tmp_path / "s0.5.json")
    calibration = tmp_path / "calibration.h5"
    calibration.write_bytes(b"statistics")
    spec, model = {"pruner": "wanda", "sparsity": 0.5}, {"path": "m", "dtype": "float32"}
    identity = provenance.checkpoint_identity(spec, model, budget, calibration)
    assert identity == provenance.checkpoint_identity(spec, model, budget, calibration)
    report = tmp_path / "prune.json"
    write_json(report, {**identity, "seconds": 1.0, "blocks": []})
    evaluation = tmp_path / "eval.json"
    write_json(evaluation, {"dataset": "d", "ppl": 9.0, "checkpoint_id": identity["checkpoint_id"]})
    out = tmp_path / "ppl.json"

    def collect():
        stages.collect("m", 0.5, "owl", "wanda", [evaluation], out, budget, report)

    collect()
    assert read_json(out)["checkpoint_id"] == identity["checkpoint_id"]
    _plan(budget, sparsities=[0.6, 0.4, 0.5])  # still an allocation, but not the pruned one
    with pytest.raises(ValueError, match=r"s0.5.json is not the budget .*prune.json was pruned"):
        collect()
    write_json(report, {"seconds": 1.0, "blocks": []})  # written before identities
    with pytest.raises(ValueError, match="records no checkpoint identity"):
        collect()
    with pytest.raises(ValueError, match="dense model m is of checkpoint"):
        stages.collect("m", None, None, None, [evaluation], out, model=model)


def test_collect_refuses_an_evaluation_of_another_checkpoint(tmp_path, capsys):
    """One line naming the evaluation, the report and the fix; no ppl.json is written."""
    budget = _plan(tmp_path / "s0.5.json")
    calibration = tmp_path / "calibration.h5"
    calibration.write_bytes(b"statistics")
    identity = provenance.checkpoint_identity({}, {"path": "m"}, budget, calibration)
    report = tmp_path / "prune.json"
    write_json(report, {**identity, "seconds": 1.0, "blocks": []})
    evaluations = [tmp_path / "a.json", tmp_path / "b.json"]
    write_json(evaluations[0], {"dataset": "a", "ppl": 9.0, **identity})
    write_json(evaluations[1], {"dataset": "b", "ppl": 9.0, "checkpoint_id": "0123456789ab"})
    out = tmp_path / "ppl.json"
    args = ["collect", "--name", "m", "--sparsity", "0.5", "--budget", str(budget)]
    args += ["--report", str(report), "--out", str(out), "--evaluations"]
    assert main([*args, *map(str, evaluations)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"svnup collect: error: {evaluations[1]} was measured on checkpoint 0123456789ab, but "
        f"{report} is of checkpoint {identity['checkpoint_id']}; delete it and re-run snakemake, "
        "which measures the run's checkpoint again"
    )
    assert not out.exists()


# --- 2. the evaluation protocol is explicit ---------------------------------------------------


def test_explicit_protocol_is_recorded_and_keys_only_its_evaluation(project):
    dataset = "data/heldout.jsonl"
    first = _json(project, RUN)
    assert first["evaluations"][dataset]["protocol"] == "plain"  # the name-based default
    write_config(project, trust_config(**{"evaluation.protocols": {dataset: "ptb"}}))
    try:
        plan = planned_jobs(project, RUN)
        assert plan == {"prune": 1, "evaluate": 1, "collect": 1}, plan
        snakemake(project, "--cores", "2", RUN)
        evaluation = _json(project, RUN)["evaluations"][dataset]
        assert evaluation["protocol"] == evaluation["spec"]["protocol"] == "ptb"
        assert evaluation["ppl"] != first["perplexity"][dataset]
    finally:
        write_config(project, trust_config())
    plan = planned_jobs(project, RUN)  # the default's evaluation is still there, under its key
    assert "evaluate" not in plan and "collect" in plan, plan


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"evaluation.protocols": {"data/other.jsonl": "ptb"}},
            "'evaluation.protocols.data/other.jsonl' of model 'tiny': data/other.jsonl is not "
            "one of evaluation.datasets",
        ),
        (
            {"evaluation.datasets": ["wikitext2"], "evaluation.protocols": {"wikitext2": "ptb"}},
            "hub dataset wikitext2 is read with protocol wikitext2, not ptb; remove the entry",
        ),
        (
            {"calibration.dataset": "c4", "calibration.protocol": "plain"},
            "'calibration.protocol' of model 'tiny': the hub dataset c4 is read",
        ),
        (
            {"evaluation.protocols": {"data/heldout.jsonl": "penn"}},
            "'evaluation.protocols.data/heldout.jsonl': 'penn' is not one of",
        ),
    ],
)
def test_bad_protocol_is_one_line(override, message):
    with pytest.raises(cfg.ConfigError, match="^config key ") as error:
        cfg.validate(tiny_config(**override))
    assert message in str(error.value)


def test_protocol_enters_the_keys_only_when_set():
    settings = cfg.model_settings(cfg.validate(tiny_config()), "tiny")
    assert "protocol" not in cfg.eval_spec(settings, "data/heldout.jsonl")
    assert "protocol" not in cfg.calibration_spec(settings)
    explicit = tiny_config(
        **{"evaluation.protocols": {"data/heldout.jsonl": "plain"}, "calibration.protocol": "ptb"}
    )
    settings = cfg.model_settings(cfg.validate(explicit), "tiny")
    assert cfg.eval_spec(settings, "data/heldout.jsonl")["protocol"] == "plain"
    assert cfg.calibration_spec(settings)["protocol"] == "ptb"


@needs_shared(PTB)
@needs_shared(C4_LLAMA)
def test_renamed_ptb_is_read_as_ptb_only_when_told(tmp_path, monkeypatch):
    """PTB's test file copied to mydata/test.txt reads as plain text by its name; with
    evaluation.protocols it gives the perplexity of the original file."""
    copy = tmp_path / "mydata" / "test.txt"
    copy.parent.mkdir()
    shutil.copy(PTB / "ptb.test.txt", copy)
    original = str(PTB / "ptb.test.txt")
    config = tiny_config(
        **{
            "models.tiny": {"path": str(C4_LLAMA), "seqlen": 256},
            "evaluation.datasets": [original, str(copy)],
            "evaluation.windows": 16,
        }
    )
    runtime = {"device": "cpu", "batch_size": 8, "offload": "auto"}
    monkeypatch.setenv("SVNUP_CACHE", str(tmp_path / "cache"))
    results = {}
    for name, dataset, protocols in (
        ("original", original, {}),
        ("renamed", str(copy), {}),
        ("told", str(copy), {str(copy): "ptb"}),
    ):
        config["evaluation"]["protocols"] = protocols
        settings = cfg.model_settings(cfg.validate(config), "tiny")
        out = tmp_path / f"{name}.json"
        spec = cfg.eval_spec(settings, dataset)
        stages.evaluate(spec, runtime, cfg.model_spec(settings), str(C4_LLAMA), out)
        results[name] = read_json(out)
    protocols = {name: result["protocol"] for name, result in results.items()}
    assert protocols == {"original": "ptb", "renamed": "plain", "told": "ptb"}
    assert results["told"]["ppl"] == results["original"]["ppl"] != results["renamed"]["ppl"]


# --- 3. N:M from the config -----------------------------------------------------------------


def _zeros_per_group(weight: torch.Tensor, m: int) -> set[int]:
    return set((weight.view(weight.shape[0], -1, m) == 0).sum(-1).unique().tolist())


NM = {
    "nm": "2:4",
    "save_model": True,
    "allocation.method": "uniform",
    "targets.allocations": ["uniform"],
    "targets.pruners": list(PRUNERS),
}


def test_nm_prunes_n_of_each_m_weights_with_every_pruner(project, tmp_path, monkeypatch):
    """wanda through the workflow (its prune job and the recipe rule); every pruner through the
    prune stage with the spec the same config makes, on the run's budget and calibration."""
    write_config(project, trust_config(**NM))
    run = "results/tiny/s0.5/uniform/wanda/ppl.json"
    recipe = "results/tiny/s0.5/uniform/wanda/recipe.yaml"
    try:
        snakemake(project, "--cores", "2", run, recipe)
    finally:
        write_config(project, trust_config())
    from transformers import AutoModelForCausalLM

    checkpoints = {"wanda": project / _json(project, run)["checkpoint"]}
    assert _json(project, checkpoints["wanda"].parent / "prune.json")["spec"]["nm"] == "2:4"
    monkeypatch.chdir(project)  # the config's paths are the project's
    settings = cfg.model_settings(cfg.validate(trust_config(**NM)), "tiny")
    calibration = Path(f"results/tiny/calibration/{cfg.key(cfg.calibration_spec(settings))}")
    runtime = {"device": "cpu", "batch_size": 8, "offload": "auto"}
    for pruner in sorted(set(PRUNERS) - {"wanda"}):
        spec = cfg.prune_spec(settings, "uniform", 0.5, pruner)
        budget = Path(f"results/tiny/budget/uniform/{spec['budget']}/s0.5.json")
        checkpoints[pruner] = out = tmp_path / pruner / "model"
        report = tmp_path / pruner / "prune.json"
        model = cfg.model_spec(settings)
        stages.prune(spec, runtime, model, budget, calibration / "calibration.h5", out, report)
    for pruner, checkpoint in checkpoints.items():
        pruned = AutoModelForCausalLM.from_pretrained(checkpoint)
        layers = [m for m in pruned.model.layers.modules() if isinstance(m, torch.nn.Linear)]
        assert len(layers) == 6 * 7
        for layer in layers:
            assert _zeros_per_group(layer.weight, 4) == {2}, pruner
        if pruner != "magnitude":
            text = (checkpoint / "recipe.yaml").read_text()
            (arguments,) = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"].values()
            assert arguments["mask_structure"] == "2:4"
    (arguments,) = yaml.safe_load((project / recipe).read_text())["sparsity_stage"][
        "sparsity_modifiers"
    ].values()
    assert arguments["mask_structure"] == "2:4"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"nm": "4:2"}, "config key 'nm' of model 'tiny': nm pattern must look like 'N:M'"),
        ({"nm": "2-4"}, "got '2-4'"),
        ({"nm": "0:4"}, "0 < N < M"),
        ({"nm": 24}, "config key 'nm': 24 is not of type 'string'"),
        ({"models.tiny.nm": "4:2"}, "config key 'nm' of model 'tiny'"),
        (
            {"nm": "2:4", "targets.allocations": ["uniform"]},
            "'allocation.method' of model 'tiny': svnup cannot be pruned with config key 'nm' "
            "2:4, which prunes every layer 2 of each 4 weights; use uniform allocation",
        ),
        (
            {"nm": "2:4", "allocation.method": "uniform"},
            "'targets.allocations' of model 'tiny': svnup cannot be pruned",
        ),
        (
            {
                "nm": "2:4",
                "allocation.method": "uniform",
                "targets.allocations": ["uniform"],
                "targets.sparsities": [0.5, 0.6],
            },
            "targets.sparsities: target sparsity 0.6 contradicts config key 'nm' 2:4",
        ),
    ],
)
def test_bad_nm_is_one_line(override, message):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.validate(tiny_config(**override))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nm_enters_the_prune_spec_only_when_set():
    def prune_spec(**overrides):
        settings = cfg.model_settings(cfg.validate(tiny_config(**overrides)), "tiny")
        return cfg.prune_spec(settings, "uniform", 0.5, "wanda")

    assert set(prune_spec()) == {"budget", "sparsity", "pruner", "calibration"}
    nm = {"nm": "2:4", "allocation.method": "uniform", "targets.allocations": ["uniform"]}
    assert prune_spec(**nm) == {**prune_spec(), "nm": "2:4"}
    per_model = {"models.tiny.nm": "4:8", "allocation.method": "uniform"}
    assert prune_spec(**per_model, **{"targets.allocations": ["uniform"]})["nm"] == "4:8"


def test_bad_nm_target_path_is_one_line():
    """The check before planning (rules/preflight.smk) refuses a target path nm cannot make."""
    from svnup import preflight

    config = cfg.validate(
        tiny_config(
            **{"nm": "2:4", "allocation.method": "uniform", "targets.allocations": ["uniform"]}
        )
    )
    bad = {
        "results/tiny/s0.5/owl/wanda/ppl.json": "target path results/tiny/s0.5/owl/wanda/"
        "ppl.json: owl cannot be pruned with config key 'nm' 2:4",
        "results/tiny/s0.6/uniform/wanda/ppl.json": "target sparsity 0.6 contradicts config "
        "key 'nm' 2:4",
    }
    assert preflight.target_model(config, "results/tiny/s0.5/uniform/wanda/ppl.json") == "tiny"
    for path, message in bad.items():
        with pytest.raises(cfg.ConfigError, match=re.escape(message)) as error:
            preflight.target_model(config, path)
        assert "\n" not in str(error.value)
