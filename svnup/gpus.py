"""Give each concurrent GPU job of a workstation its own device, and tell whether it has one.

Snakemake limits how many jobs declaring ``gpu=1`` run at once but does not say *which* GPU a job
gets. A job that asks for ``cuda`` while ``CUDA_VISIBLE_DEVICES`` is unset claims the first free
GPU with an exclusive file lock held for the life of the process, then exposes only that GPU.
Schedulers that assign GPUs themselves (SLURM sets ``CUDA_VISIBLE_DEVICES``) are left alone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("svnup")
_HELD: list = []


def gpu_count() -> int:
    """GPUs on this machine, without initialising CUDA (``SVNUP_GPUS`` overrides)."""
    if os.environ.get("SVNUP_GPUS"):
        return int(os.environ["SVNUP_GPUS"])
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def claim_gpu(runtime: dict) -> int | None:
    """Claim a free GPU for this process if the stage runs on plain ``cuda``; returns its index."""
    if runtime.get("device") != "cuda" or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    count = gpu_count()
    if count == 0:
        return None
    lock_dir = Path(os.environ.get("SVNUP_GPU_LOCKS", "/tmp/svnup-gpu-locks"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        handle = open(lock_dir / f"gpu{index}.lock", "w")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _HELD.append(handle)
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        log.info("claimed GPU %d of %d", index, count)
        return index
    raise RuntimeError(
        f"all {count} GPUs are claimed by other svnup jobs; run with resources gpu={count} "
        "so Snakemake never starts more GPU jobs than there are GPUs"
    )


# Device nodes of the GPU drivers torch can use: NVIDIA, AMD (ROCm), and CUDA under WSL 2.
DRIVER_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def cuda_problem(device: str) -> str | None:
    """Why jobs on this machine cannot use ``device`` (cuda or cuda:N), or None when they can.

    A machine without a GPU driver is told from its device nodes, without importing torch (which
    takes seconds); where a driver is present torch itself is asked, as the jobs will ask it."""
    if not any(os.path.exists(node) for node in DRIVER_NODES):
        return f"this machine has no GPU driver (none of {', '.join(DRIVER_NODES)})"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} finds no usable CUDA device"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"{device} names GPU {index}, but torch sees {torch.cuda.device_count()}"
    return None
