"""The checks before planning, through the real snakemake on a tiny project that never runs a job:
each bad input fails a dry run in one line that names the key or file and the fix, and the
spellings of one local path plan the same files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import build_tiny_llama
from workflow_fixture import build_project, snakemake_command, tiny_config, write_config

from svnup import zeroshot
from svnup.gpus import cuda_problem

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny project, plus models and datasets that are wrong in one way each."""
    root = build_project(tmp_path_factory.mktemp("preflight") / "project")
    build_tiny_llama(root / "tiny11", layers=11)
    (root / "weightless").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(root / "tiny" / name, root / "weightless" / name)
    shutil.copytree(root / "tiny", root / "gpt2")
    config = json.loads((root / "gpt2/config.json").read_text())
    (root / "gpt2/config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    (root / "data/empty.jsonl").write_text("\n\n")
    (root / "data/notext.jsonl").write_text('{"body": "a row without its text"}\n')
    (root / "data/latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    return root


def _run(root: Path, *args: str, env: dict[str, str] | None = None):
    command, base = snakemake_command(root, *args)
    return subprocess.run(
        command, cwd=root, env={**base, **(env or {})}, capture_output=True, text=True, timeout=900
    )


def _one_line_error(root: Path, config: dict, *args: str, env=None) -> str:
    """A dry run of ``config`` that must fail in one line; that line."""
    write_config(root, config)
    try:
        result = _run(root, "--dry-run", *args, env=env)
    finally:
        write_config(root, tiny_config())
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "Exception" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("svnup: "), output
    return last


def _plans(root: Path, config: dict, *args: str) -> None:
    write_config(root, config)
    try:
        result = _run(root, "--dry-run", "--quiet", "rules", *args)
    finally:
        write_config(root, tiny_config())
    assert result.returncode == 0, result.stdout + result.stderr


def _planned_files(root: Path, config: dict) -> set[str]:
    """Every output file of the plan (``--summary``): each names its cache key."""
    write_config(root, config)
    try:
        result = _run(root, "--summary")
    finally:
        write_config(root, tiny_config())
    assert result.returncode == 0, result.stdout + result.stderr
    rows = result.stdout.split("output_file\t", 1)[1].splitlines()[1:]
    return {row.split("\t")[0] for row in rows if "\t" in row}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"calibration.nsamples": 4.0}, "config key 'calibration.nsamples': 4.0 is not an integer"),
        ({"models.tiny.seqlen": 64.0}, "'models.tiny.seqlen': 64.0 is not an integer; write 64"),
        ({"evaluation.windows": 2.0}, "'evaluation.windows': 2.0 is not an integer; write 2"),
        (
            {"shapley.players": "halves", "shapley.window": 13},
            "'shapley.window' of model 'tiny': window 13 exceeds the game's 12 players",
        ),
        (
            {
                "models.tiny.path": "tiny11",
                "shapley.players": "halves",
                "shapley.estimator": "exact",
            },
            "'shapley.estimator' of model 'tiny': exact needs 2^22 coalitions",
        ),
        (
            {"models.tiny.path": "weightless"},
            "weightless holds no model weights (model.safetensors",
        ),
        ({"models.tiny.path": "gpt2"}, "gpt2 is a 'gpt2' model, a family svnup does not support"),
        (
            {"calibration.dataset": "data/empty.jsonl"},
            ("'calibration.dataset' of model 'tiny'", "data/empty.jsonl has no rows"),
        ),
        (
            {"evaluation.datasets": ["data/notext.jsonl"]},
            ("'evaluation.datasets' of", "data/notext.jsonl line 1 has no 'text' string"),
        ),
        (
            {"evaluation.datasets": ["data/latin1.txt"]},
            "data/latin1.txt is not UTF-8 text (near line 1); save it as UTF-8",
        ),
    ],
)
def test_bad_input_fails_before_planning_in_one_line(project, override, message):
    line = _one_line_error(project, tiny_config(**override))
    for part in (message,) if isinstance(message, str) else message:
        assert part in line


def test_half_block_windows_are_checked_against_players(project):
    """6 blocks are 12 half players: a window of 7 fits them (it was refused against blocks)."""
    _plans(project, tiny_config(**{"shapley.players": "halves", "shapley.window": 7}))


def test_one_model_and_dataset_written_several_ways_plan_the_same_files(project, tmp_path):
    """Trailing slashes, ./, absolute paths, and an absolute path through a link to the project
    are one spelling; the canonical one (relative inside the project) keeps its keys."""
    link = tmp_path / "link"
    link.symlink_to(project, target_is_directory=True)
    canonical = _planned_files(project, tiny_config())
    assert any("/calibration/" in path for path in canonical)
    spellings = [
        ("tiny/", "./data/train.jsonl", "data//heldout.jsonl"),
        (str(project / "tiny"), str(project / "data/train.jsonl"), "./data/heldout.jsonl"),
        (f"{link}/tiny/", f"{link}/data/train.jsonl", f"{link}/data/./heldout.jsonl"),
    ]
    for model, train, heldout in spellings:
        config = tiny_config(
            **{
                "models.tiny.path": model,
                "calibration.dataset": train,
                "evaluation.datasets": [heldout],
            }
        )
        assert _planned_files(project, config) == canonical, (model, train, heldout)


def test_cuda_is_refused_where_jobs_run_here_but_not_for_a_cluster(project):
    if cuda_problem("cuda") is None:
        pytest.skip("this machine can run CUDA jobs")
    config = tiny_config(**{"models.tiny.device": "cuda"})
    line = _one_line_error(project, config)
    assert "config key 'models.tiny.device': cuda, but" in line and "set device: cpu" in line
    # A cluster executor submits from a login node that may have no GPU: planning goes on.
    _plans(project, config, "--executor", "slurm", "--jobs", "1")


def test_hub_dataset_offline_and_not_cached_is_one_line(project, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    offline["HF_DATASETS_CACHE"] = str(tmp_path / "datasets")
    line = _one_line_error(
        project, tiny_config(**{"evaluation.datasets": ["wikitext2"]}), env=offline
    )
    assert "'evaluation.datasets' of model 'tiny': hub dataset wikitext2 (test split)" in line
    assert f"not in the Hugging Face datasets cache ({tmp_path / 'datasets'})" in line
    assert "offline mode is on" in line and "run once online" in line and "local" in line


def test_unknown_zero_shot_tasks_are_named_before_planning(project):
    """Names are checked against the harness's index (built once, then cached) and the tasks of
    the include path."""
    pytest.importorskip("lm_eval", reason=zeroshot.INSTALL_HINT)
    tasks = project / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "toy_a.yaml").write_text("task: toy_a\n")
    local = {"include_path": "./tasks/"}
    asked = {"tasks": ["toy_a", "boolqq"], **local}
    line = _one_line_error(project, tiny_config(**{"evaluation.zero_shot": asked}))
    assert "config key 'evaluation.zero_shot.tasks' of model 'tiny'" in line
    assert "unknown zero-shot task(s) boolqq (did you mean boolq?)" in line
    assert "toy_a" not in line
    indexes = {p: p.stat().st_mtime_ns for p in (project / ".cache").glob("lm-eval-tasks-*.json")}
    assert len(indexes) == 2  # the harness's own and the include path's
    _plans(project, tiny_config(**{"evaluation.zero_shot": {"tasks": ["boolq"], **local}}))
    assert {p: p.stat().st_mtime_ns for p in indexes} == indexes, "an index was built again"


def test_a_folder_of_pruned_layers_left_by_a_killed_run_is_accepted(project):
    """A run killed between a pruning (``--layers-only``, the default) and its evaluation leaves
    the pruned layers; the next run plans around them, and names the folder if they are damaged."""
    import h5py

    from svnup.content import PRUNED_LAYERS

    planned = sorted(
        path for path in _planned_files(project, tiny_config()) if path.endswith("/model")
    )
    assert planned, "the plan prunes no model"
    folder = project / planned[0]
    folder.mkdir(parents=True)
    try:
        with h5py.File(folder / PRUNED_LAYERS, "w") as f:
            f["blocks/0/q_proj"] = [1.0, 0.0]
        _plans(project, tiny_config())
        (folder / PRUNED_LAYERS).write_bytes(b"not an HDF5 file")
        line = _one_line_error(project, tiny_config())
        assert f"{PRUNED_LAYERS} is truncated or corrupt" in line
        assert f"delete the folder {planned[0]} and re-run snakemake" in line
    finally:
        shutil.rmtree(folder)
