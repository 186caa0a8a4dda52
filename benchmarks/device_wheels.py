"""Wheels of what the workflow needs and the GPU machine lacks, for the device tool to carry.

Why: the lent H200 machine has PyTorch, transformers, h5py and pandas but no snakemake, jsonschema
or gguf, and it reaches no package registry. The GPU benchmarks that run the workflow
(bench_gpu_scale.py, bench_gpu_evopress.py) need them there, so this writes their wheels, for the
machine's Python 3.12 on x86-64, into a git-ignored folder that a device call carries. Packages
the image already holds are left out, so the carried ones never shadow its torch stack. A
package published only as a source archive (connection_pool) is built into a wheel here.

    python benchmarks/device_wheels.py --out .whl
    # then in the device call: carry [".whl"] and begin the command with the line it prints,
    # python3 -m pip install ... --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Distributions in the device image ('cuda', read 2026-11-17; /work/.library/device/KINDS.md) that
# the workflow's requirements pull in.
DEVICE_IMAGE = frozenset(
    {
        "accelerate",
        "aiohappyeyeballs",
        "aiohttp",
        "aiosignal",
        "annotated-doc",
        "anyio",
        "attrs",
        "certifi",
        "charset-normalizer",
        "click",
        "cloudpickle",
        "colorama",
        "filelock",
        "frozenlist",
        "fsspec",
        "h11",
        "h5py",
        "hf-xet",
        "httpcore",
        "httpx",
        "huggingface-hub",
        "idna",
        "jinja2",
        "markupsafe",
        "markdown-it-py",
        "mdurl",
        "multidict",
        "numpy",
        "packaging",
        "pandas",
        "pillow",
        "propcache",
        "protobuf",
        "psutil",
        "pyarrow",
        "pygments",
        "pyparsing",
        "python-dateutil",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "shellingham",
        "six",
        "tabulate",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
        "typer",
        "typing-extensions",
        "urllib3",
        "wrapt",
        "xxhash",
        "yarl",
        "matplotlib",
    }
)
# Left out on purpose: pulp is the ILP scheduler's solver (16 MB of CBC builds, a quarter of
# what a call carries); the GPU scripts run snakemake with ``--scheduler greedy``.
LEFT_OUT = frozenset({"pulp"})
INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {folder}/*.whl"
    " && export PYTHONPATH=/tmp/site:$PWD"
)
# Python of the device image and the platforms its pip accepts.
PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)


def requirements() -> list[str]:
    """The workflow's packages at the versions installed here (the ones the tests ran with)."""
    return [f"{name}=={metadata.version(name)}" for name in ("snakemake", "jsonschema", "gguf")]


def distribution(wheel: Path) -> str:
    """A wheel's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"], check=True)


def download(out: Path) -> list[Path]:
    """Every wheel of the requirements' closure for the device's Python, minus the image's."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        # archives for this Python first: the closure's source-only packages, built into wheels
        _pip("download", "-d", str(local / "src"), *requirements())
        for archive in sorted((local / "src").glob("*.tar.gz")):
            _pip("wheel", "--no-deps", "-w", str(local / "built"), str(archive))
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _pip(
            "download",
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--implementation",
            "cp",
            *platforms,
            "--find-links",
            str(local / "built"),
            "-d",
            str(out),
            *requirements(),
        )
    for wheel in sorted(out.glob("*.whl")):
        if distribution(wheel) in DEVICE_IMAGE | LEFT_OUT:
            wheel.unlink()
    return sorted(out.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".whl"), help="the folder the call carries")
    args = p.parse_args(argv)
    wheels = download(args.out)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.out}:")
    for wheel in wheels:
        print(f"  {wheel.name}")
    print(f"install there with: {INSTALL.format(folder=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
