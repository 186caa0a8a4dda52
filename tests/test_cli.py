"""The command line reaches every stage with exactly the parameters the stage takes."""

import inspect
import json

import pytest

from svnup import stages
from svnup.cli import STAGES, build_parser, main


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
    spec = json.dumps(
        {"model": model, "seqlen": 16, "dataset": "x.jsonl", "nsamples": 2, "seed": 0}
    )
    assert main(["calibrate", "--spec", spec, "--out", str(tmp_path / "c.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"svnup calibrate: error: model path '{missing}' does not exist; "
        "give a local model directory or a hub id"
    ]
    assert not (tmp_path / "c.h5").exists()
