"""The SLURM profile's grouping: a submission of grouped GPU windows claims one GPU.

Why: Snakemake sizes a group job by summing the resources of the jobs that could run at once,
so without a limit 8 grouped windows would ask SLURM for 8 GPUs and 8 times the memory per CPU.
The shipped profile's per-submission ``group_slot`` makes them run one after another; this test
asks the installed Snakemake how it sizes such a group (no cluster needed; the single-node SLURM
test runs grouped CPU windows for real).
"""

from __future__ import annotations

from types import SimpleNamespace

import yaml
from snakemake.resources import GroupResources, Resources
from workflow_fixture import REPO

PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
SLURM_ONLY = ("slurm_partition", "slurm_account")


def windows_per_group() -> int:
    (per_group,) = PROFILE["group-components"]
    name, count = per_group.split("=")
    assert name == "coalitions" and PROFILE["groups"] == ["coalitions=coalitions"]
    return int(count)


def group_of_windows(constraints: list[str]) -> dict:
    """The resources Snakemake asks for a group of the profile's number of GPU windows."""
    window = {**PROFILE["default-resources"], **PROFILE["set-resources"]["coalitions"]}
    window = {k: v for k, v in window.items() if k not in SLURM_ONLY}
    window.update(gpu=1, _cores=1, _nodes=1)  # a model stage on cuda; one thread
    jobs = [[SimpleNamespace(resources=window, pipe_group=None)] * windows_per_group()]
    return GroupResources.basic_layered(
        jobs,
        Resources.parse(constraints, allow_expressions=False),
        run_local=False,
        additive_resources=["runtime"],
        sortby=["runtime"],
    )


def test_a_group_of_gpu_windows_asks_for_one_window_and_their_summed_runtime():
    assert PROFILE["set-resource-scopes"] == ["group_slot=local"]
    group = group_of_windows(PROFILE["resources"])
    window = PROFILE["set-resources"]["coalitions"]
    assert group["gpu"] == 1
    assert group["cpus_per_gpu"] == window["cpus_per_gpu"]
    assert group["mem_mb_per_cpu"] == window["mem_mb_per_cpu"]
    assert group["runtime"] == windows_per_group() * window["runtime"]


def test_without_the_slot_the_group_would_claim_a_gpu_per_window():
    assert group_of_windows([])["gpu"] == windows_per_group() > 1
