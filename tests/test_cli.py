"""The command line reaches every stage with exactly the parameters the stage takes."""

import argparse
import inspect
import json
import subprocess
import sys

import pytest

from svnup import stages
from svnup.cli import STAGES, build_parser, main
from svnup.demo import build_parser as build_demo_parser


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_parameter_has_an_option(stage):
    options = {option.rstrip("?*") for option in STAGES[stage][1]} | {"runtime"}
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
