"""A tiny, fast instance of the workflow: a 6-block random LLaMA with a trained tokenizer, a small
corpus, and a config that runs every stage in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def tiny_config(**overrides) -> dict:
    config = {
        "models": {"tiny": {"path": "tiny", "seqlen": 48, "batch_size": 8}},
        "calibration": {"dataset": "data/train.jsonl", "nsamples": 8, "seed": 0},
        "shapley": {
            "estimator": "swsv",
            "window": 3,
            "stride": 1,
            "n_permutations": 8,
            "eval_samples": 4,
            "ablation": "prune",
            "probe_sparsity": 0.5,
            "probe_pruner": "wanda",
            "value": "neg_nll",
            "targets": "text",
        },
        "allocation": {
            "method": "svnup",
            "min": 0.0,
            "max": 0.99,
            "svnup": {"lambda": 0.2},
            "owl": {"m": 5.0, "lambda": 0.08},
        },
        "pruner": "wanda",
        "evaluation": {"datasets": ["data/heldout.jsonl"], "split": "test"},
        "save_model": True,
        "keep_probes": True,
        "targets": {
            "models": ["tiny"],
            "sparsities": [0.5],
            "allocations": ["svnup", "uniform"],
            "pruners": ["wanda"],
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def build_project(root: Path, n_layers: int = 6) -> Path:
    """Write data/, tiny/ (model + tokenizer) and config.yaml under ``root``."""
    from svnup.demo import build_corpus, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    build_corpus(root / "data")
    lines = (root / "data" / "train.jsonl").read_text().splitlines()[:200]
    texts = [json.loads(line)["text"] for line in lines]
    tokenizer = train_tokenizer(texts, 256)
    build_tiny_llama(
        root / "tiny",
        layers=n_layers,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(root / "tiny")
    write_config(root, tiny_config())
    return root


def write_config(root: Path, config: dict) -> None:
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake_command(root: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run this interpreter's snakemake on ``root``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["SVNUP_CACHE"] = str(root / ".cache")
    command = [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(root),
        "--configfile",
        str(root / "config.yaml"),
    ]
    return command, env


def snakemake(root: Path, *args: str, check: bool = True, timeout: float = 900):
    """Run the real snakemake of this interpreter on the project in ``root``."""
    command, env = snakemake_command(root, *args)
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{output}")
    return result


def planned_jobs(root: Path, *targets: str) -> dict[str, int]:
    """What a dry run would execute: rule name -> job count (empty when nothing is to do)."""
    result = snakemake(root, *targets, "--dry-run", "--quiet", "rules")
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts
