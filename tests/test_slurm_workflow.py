"""End to end on SLURM: the shipped profile runs the real workflow as SLURM jobs, and the
results equal those of a local run.

Why: the profile (executor, sizing, GPU mapping, the HDF5 variable, grouped coalition jobs) is
only worth shipping if a cluster runs the workflow with it unchanged except for what differs
between clusters. The test cluster differs in partition, account (it has none) and status
command (no accounting, so squeue); the copy of the profile changes those, plus test-only knobs
that change how often the plugin polls, what it logs and which logs it keeps, never what a job
runs. It also groups fewer windows per submission than the shipped 8, so that the tiny model's
three windows become two submissions (two windows, then one).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from slurm_cluster import single_node_slurm, slurm_available
from workflow_fixture import REPO, build_project, snakemake

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.workflow,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TARGET = "results/tiny/s0.5/ppl.json"
# The model stages of TARGET; the rest are localrules and must not become SLURM jobs. The
# coalition jobs are submitted as group jobs (the plugin's log folder: group_coalitions_...).
MODEL_STAGES = {"calibrate", "probe", "prune", "evaluate"}
# set-resources asks per GPU; a model on the CPU asks for no GPU, its one thread, 8000 MB per CPU.
# A group of windows asks for the same: its windows run one after another.
JOB_TRES = ("cpu=1,", "mem=8000M")
WINDOWS_PER_SUBMISSION = 2


def cluster_profile(folder: Path, partition: str) -> Path:
    """The shipped profile with this cluster's partition, no account and squeue polling.

    The plugin polls 1 s after a submission, then waits 10 s longer after each round in which
    nothing finished (1, 12, 33 s: a 20-30 s job is seen at 33 s; the default first wait is
    40 s). ``verbose`` makes the in-job executor log its environment, which the rule's
    ``srun`` step inherits.
    """
    profile = yaml.safe_load(PROFILE.read_text())
    resources = profile["default-resources"]
    resources["slurm_partition"] = partition
    del resources["slurm_account"]
    profile["slurm-status-command"] = "squeue"
    profile["slurm-init-seconds-before-status-checks"] = 1
    profile["slurm-keep-successful-logs"] = True
    profile["verbose"] = True
    profile["group-components"] = [f"coalitions={WINDOWS_PER_SUBMISSION}"]
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def slurm_logs(root: Path) -> dict[str, dict[str, Path]]:
    """Rule (or ``group_<name>``) -> {SLURM job id: log} from the plugin's log folder."""
    logs: dict[str, dict[str, Path]] = {}
    for log in (root / ".snakemake" / "slurm_logs").glob("*/**/*.log"):
        rule = log.relative_to(root / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        logs.setdefault(rule, {})[log.stem] = log
    return logs


def perplexities(root: Path) -> dict[str, float]:
    return json.loads((root / TARGET).read_text())["perplexity"]


def shapley_values(root: Path) -> dict[str, list[float]]:
    """Column -> values of the one Shapley table; an empty cell (no stderr) reads as NaN."""
    (table,) = (root / "results" / "tiny" / "shapley").glob("*/*/shapley.csv")
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    return {
        column: [float(row[column]) if row[column] else float("nan") for row in rows]
        for column in rows[0]
    }


@pytest.mark.slow
def test_slurm_profile_runs_the_workflow_like_a_local_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e .[slurm]")
    local = build_project(tmp_path / "local", n_layers=5)  # window 3: three coalition jobs
    remote = shutil.copytree(local, tmp_path / "remote")
    # Only the profile may give jobs the HDF5 setting.
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    # The local reference runs while the cluster jobs wait for the plugin's polls.
    with ThreadPoolExecutor(1) as pool, single_node_slurm(tmp_path / "slurm") as cluster:
        reference = pool.submit(snakemake, local, "--cores", "2", TARGET)
        profile = cluster_profile(tmp_path / "profile", cluster.partition)
        run = snakemake(remote, "--workflow-profile", str(profile), TARGET)
        completed = {job["JobId"]: job for job in cluster.completed_jobs()}
        reference.result()

    logs = slurm_logs(remote)
    (group,) = [name for name in logs if name.startswith("group_coalitions")]
    assert logs.keys() - {group} == MODEL_STAGES
    windows = list((remote / "results" / "tiny" / "coalitions").glob("*/swsv/*/*.h5"))
    assert len(windows) == 3
    groups = logs[group]
    assert len(groups) == math.ceil(len(windows) / WINDOWS_PER_SUBMISSION), "windows per job"
    window_minutes = yaml.safe_load(PROFILE.read_text())["set-resources"]["coalitions"]["runtime"]
    windows_run = []
    for job_id, log in groups.items():
        # The in-job Snakemake runs each window of the group as its own step, one after another.
        ran = len(re.findall(r"^localrule coalitions:", log.read_text(), re.MULTILINE))
        windows_run.append(ran)
        assert int(completed[job_id]["TimeLimit"]) == ran * window_minutes, "runtime adds up"
    assert sorted(windows_run) == [1, 2]
    run_id = re.search(r"SLURM run ID: (\S+)", run.stdout + run.stderr).group(1)
    for rule, jobs in logs.items():
        for job_id, log in jobs.items():
            job = completed[job_id]
            assert (job["JobState"], job["Name"]) == ("COMPLETED", run_id), (rule, job)
            assert job["Partition"] == cluster.partition
            assert all(tres in job["Tres"] for tres in JOB_TRES), (rule, job["Tres"])
            assert "'HDF5_USE_FILE_LOCKING': 'FALSE'" in log.read_text(), log

    assert perplexities(remote) == pytest.approx(perplexities(local), rel=1e-6)
    remote_values, local_values = shapley_values(remote), shapley_values(local)
    assert remote_values.keys() == local_values.keys()
    for column, values in local_values.items():
        assert remote_values[column] == pytest.approx(values, rel=1e-6, nan_ok=True), column
