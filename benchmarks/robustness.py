"""A probe of bad input (issue 25, "How it is checked"): mistakes a researcher could plausibly make
in config.yaml, in the files it names, on the stage command line and in the cache, beyond the
cases that tests/test_preflight_workflow.py, tests/test_workflow.py and tests/test_cli.py check.

Each case runs the real entry point on a small project that never runs a job: ``snakemake -n``
for what the config says (the Snakefile reads config.yaml), ``python -m svnup STAGE`` for the
stage command line and for files of the cache that a stage reads (a rule passes them to its
stage). It records the exit status and the first console line that names the problem, and
passes when the run fails (status 2 for a stage: bad input, not an unexpected error), shows no
traceback, and its line starts with ``svnup`` and names the key or file of the case.

    python benchmarks/robustness.py                       # writes benchmarks/results/robustness.md
    python benchmarks/robustness.py --only yaml-syntax budget-edited-mean

tests/test_robustness.py imports CASES and checks every case cheaply (config cases through the
checks the Snakefile calls, in-process), so the table and the test cannot drift apart.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from svnup.config import key as cache_key

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
RESULTS = REPO / "benchmarks" / "results" / "robustness.md"
DELETE = object()  # a config override that removes the key
KEY = "0" * 12  # a cache key where a stage spec needs one; no stage here reads what it names
N_BLOCKS = 8  # the demo model's blocks


def base_config() -> dict:
    """A valid config of the probe project: the shipped demo model and the first rows of its
    corpus, at the smallest sizes (no job ever runs)."""
    return {
        "models": {"tiny": {"path": "model", "seqlen": 64, "batch_size": 4}},
        "calibration": {"dataset": "data/train.jsonl", "nsamples": 8, "seed": 0},
        "shapley": {
            "estimator": "swsv",
            "window": 3,
            "stride": 1,
            "n_permutations": 8,
            "eval_samples": 4,
            "ablation": "prune",
            "probe_sparsity": 0.5,
            "probe_pruner": "wanda",
            "value": "neg_nll",
            "targets": "text",
        },
        "allocation": {"method": "svnup", "min": 0.0, "max": 0.99, "svnup": {"lambda": 0.2}},
        "pruner": "wanda",
        "evaluation": {"datasets": ["data/heldout.jsonl"], "split": "test"},
        "targets": {
            "models": ["tiny"],
            "sparsities": [0.5],
            "allocations": ["svnup", "uniform"],
            "pruners": ["wanda"],
        },
    }


def edited(overrides: dict) -> dict:
    """The base config with dotted ``overrides`` applied (``DELETE`` removes a key)."""
    config = base_config()
    for dotted, value in overrides.items():
        node, (*parents, last) = config, dotted.split(".")
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return config


@dataclass(frozen=True)
class Case:
    """One bad input: ``config`` overrides (checked by ``snakemake -n``), raw ``text`` of
    config.yaml, or the ``stage`` command line (run in the project folder)."""

    name: str
    did: str  # what the user did
    names: str  # what the error line must name: the key or the file
    config: dict | None = None
    text: str | None = None
    stage: list[str] = field(default_factory=list)

    @property
    def area(self) -> str:
        if self.stage:
            return "cache" if self.name.startswith(CACHE_PREFIXES) else "stage CLI"
        return "config file" if self.text is not None else "config"


CACHE_PREFIXES = ("budget-", "ppl-", "scores-", "job-", "calibration-")


def _config(name, did, names, **overrides):
    return Case(name, did, names, config=overrides)


def _stage(name, did, names, *argv):
    return Case(name, did, names, stage=list(argv))


_MODEL = json.dumps({"path": "model", "dtype": "float32"})
_BUDGET_SPEC = json.dumps(
    {"method": "svnup", "min": 0.0, "max": 0.99, "calibration": KEY, "lambda": 0.2}
)
_UNIFORM_SPEC = json.dumps({"method": "uniform", "min": 0.0, "max": 0.99, "calibration": KEY})
_SHAPLEY_SPEC = json.dumps(
    {"store": KEY, "estimator": "swsv", "width": 3, "stride": 1, "value": "neg_nll"}
)
_EVAL_SPEC = json.dumps({"dataset": "data/heldout.jsonl", "split": "test", "seqlen": 16})
# the key of the budget spec the probe's budgets are made with, so that prune's check of the
# budget's spec passes and a case meets the check it is about
_PRUNE_SPEC = {
    "budget": cache_key(json.loads(_BUDGET_SPEC)),
    "sparsity": 0.5,
    "pruner": "wanda",
    "calibration": KEY,
}


def _budget(spec: str, *args: str, calibration="bad/calibration.h5", scores="bad/scores.json"):
    return ["budget", "--spec", spec, "--sparsity", "0.5", "--calibration", calibration,
            "--scores", scores, "--out", "out/budget.json", *args]  # fmt: skip


def _recipe(budget: str) -> list[str]:
    return [
        "recipe",
        "--budget",
        budget,
        "--pruner",
        "wanda",
        "--model",
        _MODEL,
        "--out",
        "out/recipe.yaml",
    ]


def _prune(budget: str, sparsity: float = 0.5) -> list[str]:
    spec = json.dumps({**_PRUNE_SPEC, "sparsity": sparsity})
    calibration = ["--calibration", "bad/calibration.h5"]
    return ["prune", "--spec", spec, "--model", _MODEL, "--budget", budget, *calibration,
            "--out-dir", "out/model", "--report", "out/prune.json"]  # fmt: skip


def _shapley(*jobs: str) -> list[str]:
    return ["shapley", "--spec", _SHAPLEY_SPEC, "--jobs", *jobs, "--out", "out/s.json",
            "--csv", "out/s.csv"]  # fmt: skip


def _evaluate(*args: str) -> list[str]:
    return ["evaluate", "--spec", _EVAL_SPEC, "--model", _MODEL, "--model-dir", "model",
            "--out", "out/eval.json", *args]  # fmt: skip


# fmt: off
CASES: list[Case] = [
    # --- the config file itself (Snakemake reads it before any check of svnup's) -------------
    Case("yaml-syntax", "left a flow mapping unclosed in config.yaml", "config.yaml line 3",
         text="models:\n  tiny: {path: model\ncalibration: {}\n"),
    Case("yaml-tab", "indented config.yaml with a tab", "config.yaml line 2",
         text="models:\n\ttiny: {path: model}\n"),
    Case("config-empty", "left config.yaml empty", "config.yaml is empty", text=""),
    Case("config-list", "wrote config.yaml as a list of settings", "config.yaml holds a YAML list",
         text="- models: {}\n- pruner: wanda\n"),
    # --- keys: unknown, missing, wrong types, at several levels ----------------------------------
    _config("unknown-top-key", "wrote pruners: beside pruner:", "'pruners'", pruners="wanda"),
    _config("unknown-model-key", "misspelt a model's seqlen", "'models.tiny.seqlenn'",
            **{"models.tiny.seqlenn": 64}),
    _config("unknown-method-param", "misspelt svnup's lambda", "'allocation.svnup.lamda'",
            **{"allocation.svnup.lamda": 0.2}),
    _config("missing-section", "deleted the evaluation section", "'evaluation'",
            evaluation=DELETE),
    _config("empty-section", "left shapley: with nothing under it", "'shapley'", shapley=None),
    _config("override-not-section", "overrode a model's shapley with an estimator name",
            "'models.tiny.shapley'", **{"models.tiny.shapley": "swsv"}),
    _config("save-model-text", "wrote save_model: 'yes' (quoted)", "'save_model'",
            save_model="yes"),
    _config("model-name-slash", "named a model like a hub id", "'models'",
            models={"tiny/7b": {"path": "model"}}),
    # --- target sparsities and the grid ----------------------------------------------------------
    _config("sparsity-negative", "asked for sparsity -0.5", "'targets.sparsities.0'",
            **{"targets.sparsities": [-0.5]}),
    _config("sparsity-zero", "asked for sparsity 0 (the dense model)", "'targets.sparsities.0'",
            **{"targets.sparsities": [0]}),
    _config("sparsity-text", "quoted a sparsity", "'targets.sparsities.0'",
            **{"targets.sparsities": ["0.5"]}),
    _config("sparsity-scalar", "gave one sparsity without a list", "'targets.sparsities'",
            **{"targets.sparsities": 0.5}),
    _config("sparsities-empty", "emptied the sparsities", "'targets.sparsities'",
            **{"targets.sparsities": []}),
    _config("allocations-empty", "emptied the allocations", "'targets.allocations'",
            **{"targets.allocations": []}),
    _config("sparsity-twice", "listed sparsity 0.5 twice", "'targets.sparsities'",
            **{"targets.sparsities": [0.5, 0.5]}),
    _config("allocation-twice", "listed an allocation twice", "'targets.allocations'",
            **{"targets.allocations": ["svnup", "uniform", "svnup"]}),
    _config("dataset-two-spellings", "listed one dataset twice, written two ways",
            "'evaluation.datasets'",
            **{"evaluation.datasets": ["data/heldout.jsonl", "./data/heldout.jsonl"]}),
    _config("target-models-empty", "emptied targets.models", "'targets.models'",
            **{"targets.models": []}),
    _config("allocation-max-1", "allowed blocks to be pruned entirely (max: 1.0)",
            "'allocation.max'", **{"allocation.max": 1.0}),
    _config("lambda-negative", "gave svnup a negative lambda", "'allocation.svnup.lambda'",
            **{"allocation.svnup.lambda": -0.1}),
    # --- shapley, calibration, evaluation sizes --------------------------------------------------
    _config("probe-sparsity-0", "probed at sparsity 0", "'shapley.probe_sparsity'",
            **{"shapley.probe_sparsity": 0}),
    _config("probe-sparsity-1", "probed at sparsity 1", "'shapley.probe_sparsity'",
            **{"shapley.probe_sparsity": 1}),
    _config("window-over-blocks-override", "set a model's own window above its 8 blocks",
            "'shapley.window'", **{"models.tiny.shapley": {"window": 9}}),
    _config("nsamples-0", "asked for 0 calibration samples", "'calibration.nsamples'",
            **{"calibration.nsamples": 0}),
    _config("seqlen-0", "set seqlen 0", "'models.tiny.seqlen'", **{"models.tiny.seqlen": 0}),
    _config("batch-size-0", "set batch_size 0", "'models.tiny.batch_size'",
            **{"models.tiny.batch_size": 0}),
    _config("windows-0", "asked for 0 evaluation windows", "'evaluation.windows'",
            **{"evaluation.windows": 0}),
    _config("zero-shot-no-tasks", "enabled zero_shot without tasks", "'evaluation.zero_shot.tasks'",
            **{"evaluation.zero_shot": {"limit": 10}}),
    # --- names of things that can be plugged in --------------------------------------------------
    _config("unknown-pruner", "misspelt the pruner", "'pruner'", pruner="wandaa"),
    _config("unknown-allocation", "named the allocation 'shapley'", "'allocation.method'",
            **{"allocation.method": "shapley"}),
    _config("unknown-estimator", "asked for a KernelSHAP estimator", "'shapley.estimator'",
            **{"shapley.estimator": "kernelshap"}),
    _config("unknown-hub-dataset", "named the hub dataset wikitext (not wikitext2)",
            "'calibration.dataset'", **{"calibration.dataset": "wikitext"}),
    _config("bad-dtype", "wrote dtype fp16", "'models.tiny.dtype'",
            **{"models.tiny.dtype": "fp16"}),
    _config("device-cuda-x", "wrote device cuda:x", "'models.tiny.device'",
            **{"models.tiny.device": "cuda:x"}),
    _config("device-gpu", "wrote device gpu", "'models.tiny.device'",
            **{"models.tiny.device": "gpu"}),
    # --- the files the config names --------------------------------------------------------------
    _config("model-path-is-file", "gave the model's config.json as its path", "model/config.json",
            **{"models.tiny.path": "model/config.json"}),
    _config("model-no-tokenizer", "copied a model folder without its tokenizer",
            "bad/no-tokenizer has no tokenizer", **{"models.tiny.path": "bad/no-tokenizer"}),
    _config("config-json-text-layers", "edited num_hidden_layers into text",
            "bad/text-layers/config.json", **{"models.tiny.path": "bad/text-layers"}),
    _config("config-json-zero-layers", "set num_hidden_layers 0", "bad/zero-layers/config.json",
            **{"models.tiny.path": "bad/zero-layers"}),
    _config("config-json-list", "overwrote config.json with a JSON list",
            "bad/list-config/config.json", **{"models.tiny.path": "bad/list-config"}),
    _config("weights-empty", "left a zero-byte model.safetensors (an interrupted copy)",
            "bad/empty-weights/model.safetensors", **{"models.tiny.path": "bad/empty-weights"}),
    _config("bin-weights-junk", "saved an HTML error page as pytorch_model.bin",
            "bad/junk-bin/pytorch_model.bin", **{"models.tiny.path": "bad/junk-bin"}),
    _config("dataset-zero-bytes", "calibrated on a zero-byte file", "bad/empty.txt",
            **{"calibration.dataset": "bad/empty.txt"}),
    _config("dataset-not-json-lines", "wrote plain sentences into a .jsonl", "bad/plain.jsonl",
            **{"calibration.dataset": "bad/plain.jsonl"}),
    _config("dataset-binary", "named a binary file .jsonl", "bad/binary.jsonl",
            **{"calibration.dataset": "bad/binary.jsonl"}),
    _config("dataset-gzip", "gzipped a .jsonl without renaming it", "bad/gzipped.jsonl",
            **{"evaluation.datasets": ["bad/gzipped.jsonl"]}),
    _config("dataset-csv", "gave a CSV file", "bad/rows.csv",
            **{"evaluation.datasets": ["bad/rows.csv"]}),
    _config("dataset-text-number", "stored numbers in the text column", "bad/numbers.jsonl",
            **{"evaluation.datasets": ["bad/numbers.jsonl"]}),
    _config("dataset-is-model-folder", "gave the model folder as a dataset", "model",
            **{"evaluation.datasets": ["model"]}),
    # --- the stage command line ------------------------------------------------------------------
    _stage("stage-no-spec", "ran the budget stage without --spec", "--spec",
           "budget", "--sparsity", "0.5", "--calibration", "bad/calibration.h5",
           "--out", "out/b.json"),
    _stage("stage-spec-of-other-stage", "passed a budget spec to calibrate", "--spec: this is",
           "calibrate", "--spec", _UNIFORM_SPEC, "--out", "out/calibration.h5"),
    _stage("stage-spec-unknown-keys", "misspelt two keys of a spec", "key 'seqln'",
           "evaluate", "--spec", json.dumps({"dataset": "d", "split": "test", "seqln": 16,
                                             "windws": 2}),
           "--model", _MODEL, "--model-dir", "model", "--out", "out/eval.json"),
    _stage("stage-unknown", "misspelt the stage", "'prunee'", "prunee", "--spec", "{}"),
    _stage("stage-sparsity-text", "gave --sparsity abc", "--sparsity",
           *_budget(_UNIFORM_SPEC)[:4], "abc", *_budget(_UNIFORM_SPEC)[5:]),
    _stage("stage-device-cuda-x", "gave --device cuda:x", "--device",
           *_evaluate("--device", "cuda:x")),
    _stage("stage-batch-size-0", "gave --batch-size 0", "--batch-size",
           *_evaluate("--batch-size", "0")),
    _stage("stage-threads-negative", "gave --threads -1", "--threads",
           *_evaluate("--threads", "-1")),
    _stage("stage-out-through-file", "gave an output path under a file", "bad/budget.json",
           *_budget(_UNIFORM_SPEC)[:-1], "bad/budget.json/b.json"),
    _stage("stage-out-not-writable", "gave an output path in a folder it cannot write",
           "/sys/svnup-budget.json:",
           *_budget(_UNIFORM_SPEC)[:-1], "/sys/svnup-budget.json"),
    _stage("stage-no-jobs", "ran the shapley stage without --jobs", "--jobs", *_shapley()),
    # --- files of the cache, as the stages that read them meet them ------------------------------
    _stage("calibration-truncated", "kept a half-copied calibration.h5",
           "bad/calibration-truncated.h5", *_budget(_BUDGET_SPEC,
                                                    calibration="bad/calibration-truncated.h5")),
    _stage("calibration-of-another-stage", "gave a coalition job file as --calibration",
           "bad/job.h5", *_budget(_BUDGET_SPEC, calibration="bad/job.h5")),
    _stage("job-truncated", "kept a truncated coalition window file", "bad/job-truncated.h5",
           *_shapley("bad/job-truncated.h5")),
    _stage("job-of-another-stage", "gave calibration.h5 as a coalition job",
           "bad/calibration.h5", *_shapley("bad/calibration.h5")),
    _stage("scores-null", "Shapley values with a null (NaN) value", "bad/scores-null.json",
           *_budget(_BUDGET_SPEC, scores="bad/scores-null.json")),
    _stage("scores-text", "edited a Shapley value into text", "bad/scores-text.json",
           *_budget(_BUDGET_SPEC, scores="bad/scores-text.json")),
    _stage("scores-other-model", "Shapley values of a model with 6 blocks",
           "bad/scores-six.json", *_budget(_BUDGET_SPEC, scores="bad/scores-six.json")),
    _stage("budget-edited-mean", "raised every block's sparsity in budget.json by hand",
           "bad/budget-mean.json", *_prune("bad/budget-mean.json")),
    _stage("budget-edited-count", "deleted two blocks' sparsities from budget.json",
           "bad/budget-count.json", *_recipe("bad/budget-count.json")),
    _stage("budget-edited-over-1", "set a block's sparsity to 1.2 in budget.json",
           "bad/budget-over.json", *_recipe("bad/budget-over.json")),
    _stage("budget-no-sparsities", "deleted the sparsities of budget.json",
           "bad/budget-none.json", *_recipe("bad/budget-none.json")),
    _stage("budget-other-target", "pruned to 0.7 with the budget of 0.5", "bad/budget.json",
           *_prune("bad/budget.json", 0.7)),
    _stage("ppl-edited-text", "edited a perplexity in ppl.json into text", "bad/ppl-text.json",
           "summary", "--runs", "bad/ppl-text.json", "--out", "out/summary.csv"),
    _stage("ppl-edited-negative", "edited a perplexity in ppl.json to -3", "bad/ppl-negative.json",
           "summary", "--runs", "bad/ppl-negative.json", "--out", "out/summary.csv"),
    _stage("ppl-list", "overwrote ppl.json with a JSON list", "bad/ppl-list.json",
           "summary", "--runs", "bad/ppl-list.json", "--out", "out/summary.csv"),
    _stage("ppl-none", "ran the summary stage without --runs", "--runs",
           "summary", "--out", "out/summary.csv"),
]
# fmt: on


# --- the probe project ------------------------------------------------------------------------


def _model_variant(root: Path, name: str, edit: Callable[[Path], None]) -> None:
    folder = root / "bad" / name
    shutil.copytree(root / "model", folder)
    edit(folder)


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config = change(config) or config
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def build_project(root: Path) -> Path:
    """The probe project: the demo model, the first rows of the demo corpus, config.yaml, and
    under bad/ every damaged file a case names."""
    from svnup import stages
    from svnup.io import write_json, write_scores
    from svnup.store import CoalitionRecord, write_records

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "demo" / "model", root / "model")
    (root / "data").mkdir()
    for name, rows in (("train", 200), ("heldout", 40)):
        lines = (REPO / "demo" / "corpus" / f"{name}.jsonl").read_text().splitlines()[:rows]
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    write_config(root, base_config())
    bad = root / "bad"
    bad.mkdir()

    def drop_tokenizer(folder: Path) -> None:
        for file in folder.glob("tokenizer*"):
            file.unlink()

    _model_variant(root, "no-tokenizer", drop_tokenizer)
    _model_variant(root, "text-layers", _edit_config(lambda c: c.update(num_hidden_layers="8")))
    _model_variant(root, "zero-layers", _edit_config(lambda c: c.update(num_hidden_layers=0)))
    _model_variant(root, "list-config", _edit_config(lambda c: [c]))
    _model_variant(root, "empty-weights", lambda f: (f / "model.safetensors").write_bytes(b""))

    def junk_bin(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_text("<html><body>404 Not Found</body></html>\n")

    _model_variant(root, "junk-bin", junk_bin)
    (bad / "empty.txt").write_bytes(b"")
    (bad / "plain.jsonl").write_text("A first sentence.\nA second sentence.\n")
    (bad / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (bad / "gzipped.jsonl").write_bytes(gzip.compress(b'{"text": "a row"}\n'))
    (bad / "rows.csv").write_text("text\na row\n")
    (bad / "numbers.jsonl").write_text('{"text": 3.14}\n')

    # a calibration record's metadata (what the budget stage reads), a coalition job file
    params = [10_000] * N_BLOCKS
    from svnup.io import open_h5

    with open_h5(bad / "calibration.h5", "w") as f:
        f.create_dataset("input_ids", data=[[0] * 16])
        f.create_group("blocks")
        f.attrs["meta"] = json.dumps({"block_params": params, "n_blocks": N_BLOCKS})
    records = {mask: CoalitionRecord(100.0 - mask, 64, 0.1) for mask in range(8)}
    write_records(bad / "job.h5", records, N_BLOCKS, {"job": "window-000-003"})
    for name in ("calibration", "job"):
        data = (bad / f"{name}.h5").read_bytes()
        (bad / f"{name}-truncated.h5").write_bytes(data[: len(data) // 2])
    values = [0.1 * (i + 1) for i in range(N_BLOCKS)]
    write_scores(bad / "scores.json", values, source="shapley")
    write_json(bad / "scores-null.json", {"values": [None, *values[1:]], "stderr": [None] * 8})
    write_json(bad / "scores-text.json", {"values": ["high", *values[1:]], "stderr": [None] * 8})
    write_scores(bad / "scores-six.json", values[:6], source="shapley")
    spec = json.loads(_BUDGET_SPEC)
    stages.budget(spec, 0.5, bad / "calibration.h5", bad / "scores.json", bad / "budget.json")
    plan = json.loads((bad / "budget.json").read_text())
    sparsities = plan["sparsities"]
    write_json(bad / "budget-mean.json", {**plan, "sparsities": [s + 0.1 for s in sparsities]})
    write_json(bad / "budget-count.json", {**plan, "sparsities": sparsities[:-2]})
    write_json(bad / "budget-over.json", {**plan, "sparsities": [1.2, *sparsities[1:]]})
    write_json(bad / "budget-none.json", {k: v for k, v in plan.items() if k != "sparsities"})
    run = {"model": "tiny", "target_sparsity": 0.5, "allocation": "svnup", "pruner": "wanda"}
    write_json(bad / "ppl-text.json", {**run, "perplexity": {"data/heldout.jsonl": "12.3"}})
    write_json(bad / "ppl-negative.json", {**run, "perplexity": {"data/heldout.jsonl": -3.0}})
    write_json(bad / "ppl-list.json", [run])
    return root


def write_config(root: Path, config: dict | str) -> None:
    import yaml

    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (root / "config.yaml").write_text(text)


# --- running a case ---------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    console: str  # stdout and stderr together
    seconds: float

    def line(self) -> str:
        """The first console line that names the problem: svnup's own, else the last line."""
        lines = [line for line in self.console.splitlines() if line.strip()]
        ours = [line for line in lines if line.startswith("svnup")]
        return (ours or lines or [""])[0]

    def verdict(self, case: Case) -> str:
        """'ok', or what misses the goal."""
        problems = []
        if self.status == 0:
            problems.append("accepted")
        if case.stage and self.status not in (0, 2):
            problems.append(f"status {self.status} (unexpected error)")
        if "Traceback" in self.console:
            problems.append("traceback")
        line = self.line()
        if not line.startswith("svnup"):
            problems.append("not svnup's line")
        if case.names not in line:
            problems.append(f"does not name {case.names}")
        return "ok" if not problems else "FAIL: " + ", ".join(problems)


def environment(root: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env |= {"SVNUP_CACHE": str(root / ".cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def snakemake_dry_run(root: Path, config: dict | str) -> Outcome:
    """``snakemake -n`` of the project with ``config`` as its config.yaml (restored after)."""
    write_config(root, config)
    command = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(SNAKEFILE)]
    command += ["--directory", str(root)]
    try:
        return _run(command, root)
    finally:
        write_config(root, base_config())


def stage_run(root: Path, argv: list[str]) -> Outcome:
    return _run([sys.executable, "-m", "svnup", *argv], root)


def _run(command: list[str], root: Path) -> Outcome:
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=root, env=environment(root), capture_output=True, text=True, timeout=600
    )
    console = (result.stdout + result.stderr).replace(f"{root}/", "")  # paths as in config.yaml
    return Outcome(result.returncode, console, time.perf_counter() - start)


def run_case(root: Path, case: Case) -> Outcome:
    if case.stage:
        return stage_run(root, case.stage)
    return snakemake_dry_run(root, case.text if case.text is not None else edited(case.config))


# --- the table --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[tuple[Case, Outcome]]) -> str:
    lines = [
        "| # | area | case | what the user did | exit | first line naming the problem | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, (case, outcome) in enumerate(rows, 1):
        cells = [str(number), case.area, f"`{case.name}`", case.did, str(outcome.status)]
        cells += [f"`{outcome.line()}`", outcome.verdict(case)]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the Markdown table to write")
    parser.add_argument("--only", nargs="*", default=None, help="run these cases only (no table)")
    parser.add_argument("--root", type=Path, default=None, help="probe project folder (a temp one)")
    args = parser.parse_args(argv)
    import tempfile

    names = {case.name for case in CASES}
    assert len(names) == len(CASES), "case names must be unique"
    unknown = set(args.only or []) - names
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        root = build_project((args.root or Path(tmp)) / "project")
        control = snakemake_dry_run(root, base_config())
        if control.status != 0:
            print(control.console, file=sys.stderr)
            raise SystemExit("the base config of the probe project does not plan; fix it first")
        rows = []
        for case in CASES:
            if args.only is not None and case.name not in args.only:
                continue
            outcome = run_case(root, case)
            rows.append((case, outcome))
            verdict = outcome.verdict(case)
            print(f"{case.name}: {verdict} ({outcome.seconds:.1f} s) {outcome.line()}")
    failed = [case.name for case, outcome in rows if outcome.verdict(case) != "ok"]
    if args.only is None:
        text = [
            "# Robustness probe: bad input",
            "",
            "Produced by `python benchmarks/robustness.py` (cases: `benchmarks/robustness.py`,",
            "`CASES`; checked in CI by `tests/test_robustness.py`). Each config case is a",
            "`snakemake -n` of a small project (the demo model, the first rows of the demo corpus)",
            "with one mistake in config.yaml or in a file it names; each stage and cache case runs",
            "`python -m svnup STAGE` in that project. A case is ok when the run fails, shows no",
            "traceback (a stage: exit status 2, bad input), and its first line of svnup's names",
            "the key or file of the case.",
            "",
            f"{len(rows)} cases, {len(rows) - len(failed)} ok.",
            "",
            table(rows),
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(text))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
