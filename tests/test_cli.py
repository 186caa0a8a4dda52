"""The command line reaches every stage with exactly the parameters the stage takes."""

import argparse
import inspect
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from svnup import stages
from svnup.cli import STAGES, build_parser, main
from svnup.demo import build_parser as build_demo_parser


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_parameter_has_an_option(stage):
    options = {option.rstrip("?*!") for option in STAGES[stage][1]} | {"runtime"}
    parameters = set(inspect.signature(getattr(stages, stage)).parameters)
    assert parameters <= options, parameters - options
    assert options - {"runtime"} <= parameters


def test_bad_json_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["calibrate", "--spec", "{nope", "--out", "x.h5"])
    assert exit_info.value.code == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_bad_input_is_one_line_with_status_2(tmp_path, capsys):
    missing = tmp_path / "missing-model"
    model = {"path": str(missing), "dtype": "float32"}
    data = tmp_path / "x.jsonl"
    data.write_text('{"text": "a calibration document"}\n')
    spec = json.dumps(
        {"model": model, "seqlen": 16, "dataset": str(data), "nsamples": 2, "seed": 0}
    )
    assert main(["calibrate", "--spec", spec, "--out", str(tmp_path / "c.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"svnup calibrate: error: model path '{missing}' does not exist; "
        "give a local model directory or a hub id"
    ]
    assert not (tmp_path / "c.h5").exists()


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("parser", [build_parser(), build_demo_parser()], ids=["svnup", "demo"])
def test_help_is_plain_text_and_explains_every_option(parser):
    for each in _parsers(parser):
        text = each.format_help()
        assert "``" not in text and ":func:" not in text, text
        unexplained = [a.dest for a in each._actions if not a.help]
        assert not unexplained, f"{each.prog}: options without help: {unexplained}"


def test_help_names_the_commands_as_typed():
    run = [sys.executable, "-m", "svnup"]
    top = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert top.split("\n\n")[1].startswith("python -m svnup STAGE")
    for args in (["demo", "--help"], ["demo", "train", "--help"]):
        text = subprocess.run([*run, *args], capture_output=True, text=True, check=True).stdout
        assert text.startswith("usage: python -m svnup demo") and "svnup.demo" not in text


def test_a_missing_dataset_is_reported_before_the_model_loads(tmp_path, capsys):
    model = {"path": str(tmp_path / "never-loaded"), "dtype": "float32"}
    spec = {"dataset": str(tmp_path / "gone.jsonl"), "split": "test", "seqlen": 16}
    args = ["--model", json.dumps(model), "--model-dir", model["path"], "--out", "x.json"]
    assert main(["evaluate", "--spec", json.dumps(spec), *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "gone.jsonl' is neither a hub name nor an existing path" in line


# --- every error is one line: the file, what is wrong, the fix; the spec is checked first ---------


def _svnup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svnup", *args], capture_output=True, text=True)


def _error(result: subprocess.CompletedProcess, stage: str, status: int = 2) -> str:
    """The one error line of a failed stage, without its prefix."""
    assert result.returncode == status, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"svnup {stage}: error: "), line
    return line.removeprefix(f"svnup {stage}: error: ")


MODEL = json.dumps({"path": "never-loaded", "dtype": "float32"})


def test_a_missing_file_is_named_with_what_and_how_to_fix(tmp_path):
    missing = tmp_path / "budget.json"
    args = ["--budget", str(missing), "--pruner", "wanda", "--model", MODEL, "--out", "r.yaml"]
    line = _error(_svnup("recipe", *args), "recipe")  # was "error: 2", the errno
    assert line == f"{missing}: No such file or directory: check the path"


def _task_spec(source: Path) -> str:
    spec = {"source": str(source), "split": "test", "name": "toy", "n_docs": 2, "n_choices": 2}
    spec |= {"seed": 0, "context_sentences": 1, "max_sentence_bytes": 100}
    return json.dumps(spec)


def test_an_unreadable_data_file_is_named_with_its_line(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("A first row.\nA caf\u00e9 row.\n".encode("latin-1"))
    args = ["--spec", _task_spec(latin), "--out-dir", str(tmp_path / "task")]
    line = _error(_svnup("zeroshot_task", *args), "zeroshot_task")  # was "error: utf-8"
    assert line.startswith(f"{latin}: line 2 is not UTF-8 text (byte 0xe9): save the file as")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "A row."}\n{"text": "A row.", }\n')
    args = ["--spec", _task_spec(rows), "--out-dir", str(tmp_path / "task")]
    line = _error(_svnup("zeroshot_task", *args), "zeroshot_task")
    assert line.startswith(f"{rows}: line 2 column 20 is not valid JSON (Expecting property name")


def test_invalid_json_is_named_with_its_line_and_column(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text('{"values": [1, 2],\n "stderr": [nan]}\n')
    calibration = tmp_path / "calibration.h5"
    spec = json.dumps({"method": "uniform", "min": 0.0, "max": 0.9, "calibration": "0" * 12})
    result = _svnup("curve", "--spec", '{"levels": [0.5],', "--scores", str(scores), "--out", "x")
    line = _error(result, "curve")
    assert line.startswith("argument --spec: not valid JSON (Expecting property name enclosed")
    assert "at line 1 column 18" in line and line.endswith("see python -m svnup curve --help")
    args = ["--sparsity", "0.5", "--calibration", str(calibration), "--out", "b.json"]

    with h5py.File(calibration, "w") as f:
        f.attrs["meta"] = json.dumps({"block_params": [1, 1]})
    line = _error(_svnup("budget", "--spec", spec, *args, "--scores", str(scores)), "budget")
    assert line.startswith(f"{scores} is truncated or corrupt (not valid JSON: Expecting value")
    assert "line 2 column 13" in line


def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path):
    run = tmp_path / "ppl.json"
    run.write_text('{"model": "tiny"}')
    result = _svnup("summary", "--runs", str(run), "--out", str(tmp_path / "summary.csv"))
    line = _error(result, "summary", status=1)
    assert line == "unexpected KeyError: 'perplexity'; the traceback is in the log"
    assert "Traceback (most recent call last)" in result.stdout and "KeyError" in result.stdout


EVAL = {"dataset": "data.jsonl", "split": "test", "seqlen": 16}
SEARCH = {"calibration": "0" * 12, "search": "atp", "pruner": "wanda", "min": 0, "max": 0.9}
LEVELS = {"calibration": "0" * 12, "pruner": "wanda", "num_levels": 8, "weights_diff": 0.03}


@pytest.mark.parametrize(
    ("stage", "option", "value", "message"),
    [
        ("evaluate", "spec", {**EVAL, "windows": -3}, "key 'windows': -3 is less than the minimum"),
        ("evaluate", "spec", {**EVAL, "seqlen": 16.0}, "key 'seqlen': 16.0 is not an integer; "),
        ("evaluate", "spec", {**EVAL, "windws": 3}, "key 'windws': unknown key; remove it or"),
        ("evaluate", "spec", {"dataset": "d", "split": "test"}, "key 'seqlen': required key is"),
        ("evaluate", "spec", [], "[] is not of type 'object'"),
        ("evaluate", "model", {"path": "m", "dtype": "fp8"}, "key 'dtype': 'fp8' is not one of"),
        ("calibrate", "spec", {"seqlen": 16}, "key 'model': required key is missing"),
        ("probe", "spec", {"calibration": "x", "sparsity": 0.5, "pruner": "wanda"}, "'x' does not"),
        ("probe", "spec", {"calibration": "0" * 12, "sparsity": 1.5, "pruner": "wanda"}, "1.5 is"),
        ("probe", "spec", {"calibration": "0" * 12, "sparsity": 0.5, "pruner": "x"}, "'x' is not"),
        ("coalitions", "estimator", {"estimator": "swsv", "width": 0}, "key 'width': 0 is less"),
        ("coalitions", "estimator", {"estimator": "nope"}, "key 'estimator': 'nope' is not one"),
        ("search", "spec", {"search": "atp", "step": 0.5}, "key 'calibration': required key"),
        ("search", "spec", {**SEARCH, "search": "evopress"}, "key 'probe_pruner': required"),
        ("levels", "spec", {"calibration": "0" * 12, "pruner": "wanda"}, "key 'num_levels': req"),
        ("levels", "spec", {**LEVELS, "weights_diff": 0}, "key 'weights_diff': 0 is less than or"),
        ("budget", "spec", {"method": "svnup", "min": 0, "max": 0.9}, "key 'calibration'"),
        (
            "budget",
            "spec",
            {"method": "svnup", "min": 0, "max": 0.9, "calibration": "0" * 12},
            "key 'lambda': required key is missing",
        ),
        ("metric", "spec", {"metric": "owl", "m": -1}, "key 'm': -1 is less than or equal to"),
        ("zeroshot", "spec", {"tasks": [], "limit": None}, "key 'include_path': required key"),
    ],
)
def test_stages_check_their_json_options_first(tmp_path, stage, option, value, message):
    """Every other argument names a file that is not there: the check comes before any work."""
    valid = {"evaluate": EVAL, "coalitions": {"calibration": "0" * 12, "ablation": "skip"}}
    valid["coalitions"]["eval_samples"] = 1
    options = {"spec": valid.get(stage), "model": {"path": "m", "dtype": "float32"}}
    options |= {"estimator": {"estimator": "swsv", "width": 2, "stride": 1}, option: value}
    args = []
    for name in STAGES[stage][1]:
        if name.endswith("!"):  # a flag: off
            continue
        name = name.rstrip("?*")
        flag = "--" + name.replace("_", "-")
        if name in options:
            args += [flag, json.dumps(options[name])]
        elif name == "sparsity":
            args += [flag, "0.5"]
        elif name == "job":
            args += [flag, "window-000-002"]
        else:
            args += [flag, str(tmp_path / name)]
    line = _error(_svnup(stage, *args), stage)
    assert line.startswith(f"--{option}: ") and message in line, line
    assert list(tmp_path.iterdir()) == []


def _config_only_model(folder: Path) -> Path:
    """A model folder with nothing but its config.json: enough for every check before loading."""
    folder.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 2, "max_position_embeddings": 256}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_seqlen_is_checked_against_the_models_context_before_it_loads(tmp_path):
    folder = _config_only_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a row"}\n')
    model = {"path": str(folder), "dtype": "float32"}
    spec = {"dataset": str(data), "split": "test", "seqlen": 100000}
    args = ["--model", json.dumps(model), "--model-dir", str(folder), "--out", "x.json"]
    line = _error(_svnup("evaluate", "--spec", json.dumps(spec), *args), "evaluate")
    assert line == (
        f"--spec: key 'seqlen': 100000 exceeds the context of model {folder} "
        "(max_position_embeddings 256); use a seqlen <= 256"
    )
    spec = {"model": model, "dataset": str(data), "seqlen": 257, "nsamples": 1, "seed": 0}
    line = _error(_svnup("calibrate", "--spec", json.dumps(spec), "--out", "c.h5"), "calibrate")
    assert line.startswith("--spec: key 'seqlen': 257 exceeds the context of model")


def test_the_specs_the_workflow_builds_fit_the_stage_schemas():
    """The rules pass what svnup.config builds: every variant of it must pass the checks."""
    from workflow_fixture import tiny_config

    from svnup import config as cfg
    from svnup import zeroshot
    from svnup.registry import ALLOCATIONS, PRUNERS
    from svnup.shapley import ESTIMATORS
    from svnup.specs import check

    variants = [
        {},
        {"shapley.players": "halves", "shapley.targets": "dense"},
        {"shapley.ablation": "skip", "shapley.probe_pruner": "match"},
        {"evaluation.windows": 4, "models.tiny.path": "demo/model"},
        {
            "nm": "2:4",
            "evaluation.protocols": {"data/heldout.jsonl": "ptb"},
            "calibration.protocol": "ptb",
        },
        {"shapley.players": "layers", "allocation.lsa": {"granularity": "projection"}},
        {"evaluation.zero_shot": {"tasks": ["toy_a"], "include_path": "tasks", "limit": 0.5}},
    ]
    for overrides in variants:
        s = cfg.model_settings(tiny_config(**overrides), "tiny")
        check("calibrate", "spec", cfg.calibration_spec(s))
        check("evaluate", "spec", cfg.eval_spec(s, "data/heldout.jsonl"))
        check("evaluate", "model", cfg.model_spec(s))
        check("collect", "model", cfg.model_spec(s))
        if zeroshot.spec(s) is not None:
            check("zeroshot", "spec", zeroshot.spec(s))
        for game in cfg.games(s):
            if s["shapley"]["ablation"] == "prune":
                check("probe", "spec", cfg.probe_spec(game))
            check("coalitions", "spec", cfg.store_spec(game))
            for estimator in ESTIMATORS:
                check("coalitions", "estimator", cfg.estimator_params(game, estimator))
                check("shapley", "spec", cfg.shapley_spec(game, estimator))
        for method, entry in ALLOCATIONS.items():
            for pruner in PRUNERS:
                check("budget", "spec", cfg.budget_spec(s, method, pruner))
                check("prune", "spec", cfg.prune_spec(s, method, 0.5, pruner))
                kind = entry.source.kind if entry.source else None
                stage = {"levels": "curve", "metric": "metric", "search": "search"}.get(kind)
                if stage:
                    check(stage, "spec", cfg.score_spec(s, method, pruner))
                if cfg.database_spec(s, method, pruner) is not None:
                    check("levels", "spec", cfg.database_spec(s, method, pruner))
