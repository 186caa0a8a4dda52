"""Smoke test: a two-rule workflow runs as real SLURM jobs through the executor plugin.

Why: the SLURM profile is only worth shipping if ``snakemake --profile`` really submits with
``sbatch``, polls to completion and maps ``gpu=1`` onto a GPU request that SLURM honours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import single_node_slurm, slurm_available

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]

SNAKEFILE = """
localrules: all

rule all:
    input: "cpu.txt", "gpu.txt"

rule cpu:
    output: "cpu.txt"
    shell: "echo $SLURM_JOB_ID > {output}"

rule gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES > {output}"
"""

# squeue, not sacct: the test cluster keeps no accounting database (sacct fails and the
# run hangs).  The plugin only keeps squeue while MinJobAge (600 s in slurm.conf) is at least
# 3 x init-seconds.  The two rules are independent so one polling cycle sees both finish:
# checks come at +5 s, then +15 s later (the plugin adds 10 s per unfinished cycle).
PROFILE = """executor: slurm
jobs: 2
seconds-between-status-checks: 1
slurm-status-command: squeue
slurm-init-seconds-before-status-checks: 5
slurm-keep-successful-logs: true
default-resources:
  slurm_partition: {partition}
  runtime: 5
  mem_mb: 200
"""


def test_workflow_runs_as_slurm_jobs(tmp_path: Path) -> None:
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install .[slurm]")
    workflow = tmp_path / "workflow"
    profile = tmp_path / "profile"
    workflow.mkdir()
    profile.mkdir()
    (workflow / "Snakefile").write_text(SNAKEFILE)
    with single_node_slurm(tmp_path / "slurm") as cluster:
        (profile / "config.yaml").write_text(PROFILE.format(partition=cluster.partition))
        run = subprocess.run(
            [sys.executable, "-m", "snakemake", "--profile", str(profile)],
            cwd=workflow,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        cpu_job = (workflow / "cpu.txt").read_text().split()
        gpu_job, gpu_devices = (workflow / "gpu.txt").read_text().split()
        gpu_details = cluster.run("scontrol", "show", "job", gpu_job)
        cpu_details = cluster.run("scontrol", "show", "job", cpu_job[0])
        completed = {job["JobId"]: job for job in cluster.completed_jobs()}

    assert len(cpu_job) == 1, "the CPU job must not see a GPU"
    assert cpu_job[0] != gpu_job
    assert gpu_devices == "0", "SLURM's gres plugin sets CUDA_VISIBLE_DEVICES for gpu=1"
    assert "TresPerJob=gres:gpu:1" in gpu_details
    assert "gres:gpu" not in cpu_details
    for job_id, rule in ((cpu_job[0], "cpu"), (gpu_job, "gpu")):
        assert completed[job_id]["JobState"] == "COMPLETED"
        assert completed[job_id]["Partition"] == cluster.partition
        assert (workflow / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job_id}.log").exists()
