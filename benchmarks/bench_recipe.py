"""Recipe benchmark: does llm-compressor, given svnup's recipe, prune to svnup's allocation?

Why: the recipe is only useful if llm-compressor reads it as svnup means it (one sparsity per
decoder block, in order). This prunes a model twice with the same non-uniform allocation and the
same calibration windows, once with svnup and once with ``llmcompressor.oneshot`` on the recipe
svnup wrote, and compares the per-block sparsities and WikiText-2 perplexities.

Needs llm-compressor, which pins its own transformers, so run it in a separate environment:

    python -m venv /tmp/lc && . /tmp/lc/bin/activate && pip install torch==2.13.0 \
        && pip install llmcompressor && pip install -e .
    python benchmarks/bench_recipe.py --model stories260K --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from bench_core import C4, WIKITEXT, _model_path, _row

from svnup import export
from svnup.allocation import allocate
from svnup.data import calibration_samples, eval_stream
from svnup.models import BlockModel, linear_layers, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import prune_model

SEED = 0
COLUMNS = ("pruner", "pruned by", "per-block sparsity", "mean (weighted)", "wikitext2 ppl", "s")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stories260K")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows from C4")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "recipe.md"
    )
    args = parser.parse_args(argv)
    if not _model_path(args.model).is_dir():
        parser.error(f"--model: no model directory {args.model!r}")
    try:
        metadata.version("llmcompressor")
    except metadata.PackageNotFoundError:
        parser.error("llm-compressor is missing; see this script's docstring")
    return args


def _block_sparsity(engine: BlockModel) -> list[float]:
    found = []
    for block in engine.blocks:
        layers = linear_layers(block).values()
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
        found.append(zeros / sum(layer.weight.numel() for layer in layers))
    return found


def _oneshot(model, calibration: torch.Tensor, recipe: Path) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    rows = calibration.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    oneshot(
        model=model,
        dataset=dataset,
        recipe=str(recipe),
        num_calibration_samples=len(rows),
        max_seq_length=calibration.shape[1],
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    engine, tokenizer = load_model(_model_path(args.model))
    stream = eval_stream(tokenizer, str(WIKITEXT), split="test", seqlen=args.seqlen)
    calibration = calibration_samples(
        tokenizer, str(C4), args.nsamples, args.seqlen, seed=SEED, split="validation"
    )
    params = np.asarray(engine.block_params(), dtype=np.float64)
    importance = np.arange(engine.n_blocks, 0, -1, dtype=np.float64)  # earlier blocks matter more
    sparsities = allocate("svnup", importance, params, args.target, (0.0, 0.99), **{"lambda": 0.2})
    blocks = export.block_names(engine.family.blocks, engine.n_blocks)
    dense = {key: value.clone() for key, value in engine.model.state_dict().items()}
    lines = [
        "# Recipe benchmark: svnup's allocation pruned by svnup and by llm-compressor",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, transformers {metadata.version('transformers')}, "
        f"llm-compressor {metadata.version('llmcompressor')}",
        f"- model {args.model}; allocation: SV-NUP mapping (lambda 0.2) of the importance "
        f"{importance.astype(int).tolist()} at target {args.target}: "
        f"{[round(float(s), 4) for s in sparsities]}",
        f"- both prune with the same {args.nsamples} x {args.seqlen} C4 calibration windows "
        f"(seed {SEED}); llm-compressor reads the recipe svnup writes (svnup.export.recipe); "
        "WikiText-2 test perplexity over non-overlapping windows of "
        f"{args.seqlen} tokens; s: pruning wall time",
        "",
        _row(*COLUMNS),
        _row(*("---" for _ in COLUMNS)),
    ]
    print("\n".join(lines), flush=True)

    def emit(pruner: str, by: str, seconds: float) -> None:
        measured = _block_sparsity(engine)
        ppl = stream_perplexity(engine, stream, args.seqlen).ppl
        lines.append(
            _row(
                pruner,
                by,
                ", ".join(f"{s:.4f}" for s in measured),
                f"{float(np.dot(measured, params) / params.sum()):.4f}",
                f"{ppl:.2f}",
                f"{seconds:.1f}",
            )
        )
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for pruner in args.pruners:
            engine.model.load_state_dict(dense)
            start = time.perf_counter()
            prune_model(engine, calibration, sparsities.tolist(), pruner)
            emit(pruner, "svnup", time.perf_counter() - start)
            recipe = Path(tmp) / f"{pruner}.yaml"
            export.write_recipe(recipe, export.recipe(pruner, sparsities.tolist(), blocks), [])
            engine.model.load_state_dict(dense)
            start = time.perf_counter()
            _oneshot(engine.model, calibration, recipe)
            emit(pruner, "llm-compressor", time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
