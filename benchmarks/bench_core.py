"""Core benchmark: WikiText-2 perplexity of uniformly pruned models, and what each step costs.

Why: the pruners and the block engine are the base every allocation experiment stands on, so their
numbers on the shared fixtures (dense perplexity against the reference figures, the usual
magnitude > Wanda > SparseGPT ordering after pruning) and their run times are checked in one place.

    python benchmarks/bench_core.py --models stories260K c4-llama-12L --sparsities 0.5 0.6 0.7

On a CPU shared with other jobs, ``--threads 1`` avoids threads waiting on each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from svnup.data import calibration_samples, eval_stream
from svnup.models import BlockModel, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import PRUNERS, prune_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-v1"
C4 = SHARED / "data" / "c4" / "c4-validation-2k.jsonl"
SEED = 0
COLUMNS = ("model", "method", "sparsity", "wikitext2 ppl", "prune s", "eval s")


def _model_path(name: str) -> Path:
    """A model directory given as a path, or by its name under ../shared/models."""
    path = Path(name).expanduser()
    return path if path.is_dir() else SHARED / "models" / name


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["stories260K", "c4-llama-12L"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows from C4")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "core.md"
    )
    args = parser.parse_args(argv)
    for name in args.models:
        if not _model_path(name).is_dir():
            parser.error(f"--models: no model directory {name!r} (nor {_model_path(name)})")
    for path in (WIKITEXT, C4):
        if not path.exists():
            parser.error(f"fixture {path} is missing; ../shared must sit beside the checkout")
    if not all(0 < s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.nsamples < 1 or args.seqlen < 2 or args.threads < 0:
        parser.error(
            f"--nsamples must be >= 1, --seqlen >= 2 and --threads >= 0, "
            f"got {args.nsamples}, {args.seqlen}, {args.threads}"
        )
    return args


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _perplexity(engine: BlockModel, stream: torch.Tensor, seqlen: int) -> tuple[float, float]:
    result = stream_perplexity(engine, stream, seqlen, dataset="wikitext2", split="test")
    return result.ppl, result.seconds


def bench_model(name: str, args: argparse.Namespace, emit) -> None:
    """Dense perplexity, then every (sparsity, pruner) from the same dense weights."""
    engine, tokenizer = load_model(_model_path(name))
    stream = eval_stream(tokenizer, str(WIKITEXT), split="test", seqlen=args.seqlen)
    calibration = calibration_samples(
        tokenizer, str(C4), args.nsamples, args.seqlen, seed=SEED, split="validation"
    )
    dense = {key: value.clone() for key, value in engine.model.state_dict().items()}
    ppl, seconds = _perplexity(engine, stream, args.seqlen)
    emit(_row(name, "dense", "0.00", f"{ppl:.2f}", "-", f"{seconds:.1f}"))
    for sparsity in args.sparsities:
        for method in PRUNERS:
            engine.model.load_state_dict(dense)
            start = time.perf_counter()
            prune_model(engine, calibration, [sparsity] * engine.n_blocks, method)
            prune_seconds = time.perf_counter() - start
            ppl, seconds = _perplexity(engine, stream, args.seqlen)
            emit(
                _row(
                    name,
                    method,
                    f"{sparsity:.2f}",
                    f"{ppl:.2f}",
                    f"{prune_seconds:.1f}",
                    f"{seconds:.1f}",
                )
            )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    lines = [
        "# Core benchmark: uniform pruning, WikiText-2 test perplexity",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- evaluation: WikiText-2 test, rows joined with blank lines, non-overlapping windows of "
        f"{args.seqlen} tokens; calibration: {args.nsamples} x {args.seqlen} tokens from "
        f"{C4.name}, seed {SEED}",
        "- prune s: wall time of the sequential pruner; eval s: of the perplexity pass",
        "",
        _row(*COLUMNS),
        _row(*("---" for _ in COLUMNS)),
    ]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    for name in args.models:
        bench_model(name, args, emit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
