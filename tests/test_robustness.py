"""Every case of the robustness probe (benchmarks/robustness.py, whose table is
benchmarks/results/robustness.md), checked cheaply and with the probe's own verdict: config cases
through the checks the Snakefile makes before planning, called in-process in its order; stage and
cache cases through the stage command line's ``main``, in-process. One real dry run shows that the
Snakefile reaches the config file's check before Snakemake reads it.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from contextlib import chdir, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from svnup import cli, preflight
from svnup import config as cfg
from svnup.io import CorruptFileError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
_spec = importlib.util.spec_from_file_location("robustness", SCRIPT)
robustness = importlib.util.module_from_spec(_spec)
sys.modules["robustness"] = robustness  # dataclasses resolve their module by name
_spec.loader.exec_module(robustness)
CASES, Outcome = robustness.CASES, robustness.Outcome


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return robustness.build_project(tmp_path_factory.mktemp("robustness") / "project")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SVNUP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def before_planning(root: Path, config: dict | str) -> Outcome:
    """What the Snakefile checks before planning, in its order, with its one-line exit: the
    config file (Snakefile), the schema and cross-field rules (rules/common.smk), each target
    model (rules/preflight.smk)."""
    robustness.write_config(root, config)
    try:
        with chdir(root):
            cfg.check_config_file("config.yaml")
            if isinstance(config, dict):
                cfg.validate(config)
                for model in config["targets"]["models"]:
                    preflight.check_model(cfg.model_settings(config, model), model)
    except (cfg.ConfigError, CorruptFileError) as error:
        return Outcome(1, f"svnup: {error}", 0.0)
    finally:
        robustness.write_config(root, robustness.base_config())
    return Outcome(0, "", 0.0)


def stage_main(root: Path, argv: list[str]) -> Outcome:
    """``python -m svnup`` in-process: its exit status and everything it printed."""
    out, err = io.StringIO(), io.StringIO()
    with chdir(root), redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exit_info:  # a usage error
            status = exit_info.code
    return Outcome(status, out.getvalue() + err.getvalue(), 0.0)


def test_the_probe_has_forty_distinct_cases_and_a_project_that_plans(project):
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)
    assert before_planning(project, robustness.base_config()).status == 0


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_that_names_it(project, case):
    if case.stage:
        outcome = stage_main(project, case.stage)
    else:
        config = case.text if case.text is not None else robustness.edited(case.config)
        outcome = before_planning(project, config)
    assert outcome.verdict(case) == "ok", outcome.console
    assert not list(project.glob("out/*")), "a failed stage left an output"


@pytest.mark.workflow
def test_the_snakefile_names_a_yaml_error_before_snakemake_reads_the_file(project):
    (case,) = [case for case in CASES if case.name == "yaml-syntax"]
    outcome = robustness.snakemake_dry_run(project, case.text)
    assert outcome.verdict(case) == "ok", outcome.console
