"""Core benchmark: WikiText-2 perplexity of uniformly pruned models, and what each step costs.

Why: the pruners and the block engine are the base every allocation experiment stands on, so their
numbers on the shared fixtures (dense perplexity and pruned perplexity against the reference
figures of ../shared/README.md, SparseGPT ahead of Wanda and magnitude after pruning) and their
run times are checked in one place.

    python benchmarks/bench_core.py --models c4-llama-12L --sparsities 0.5 0.6 0.7 0.8 \
        --timing-baseline 603c6c2

Calibration follows the SparseGPT protocol on the first ``--c4-documents`` documents of the shared
C4 file (c4-llama-12L was trained on documents 0-1599), written once to a git-ignored cache.
``--timing-baseline REV`` also times ``sparsegpt_prune`` against the kernel of git revision REV
on synthetic layers. On a CPU shared with other jobs, ``--threads 1`` avoids threads waiting on
each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import torch

from svnup.data import calibration_samples, eval_stream
from svnup.io import atomic_path
from svnup.kernels import LayerStats, sparsegpt_prune
from svnup.models import BlockModel, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import PRUNERS, prune_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-v1"
C4 = SHARED / "data" / "c4" / "c4-validation-2k.jsonl"
CACHE = Path(__file__).resolve().parent / ".cache"
REPO = Path(__file__).resolve().parents[1]
SEED = 0
COLUMNS = ("model", "method", "sparsity", "wikitext2 ppl", "reference", "ppl / ref", "prune s")
# ../shared/README.md: reference kernels, same protocol (Wanda with the reference's floor count),
# for (seqlen, nsamples, c4 documents) = REFERENCE_PROTOCOL only.
REFERENCE_PROTOCOL = (512, 128, 1600)
REFERENCE = {
    ("c4-llama-12L", "dense"): {0.0: 11.89},
    ("c4-llama-12L", "sparsegpt"): {0.5: 12.98, 0.6: 15.03, 0.7: 21.61, 0.8: 42.03},
    ("c4-llama-12L", "wanda"): {0.5: 14.29, 0.6: 18.54, 0.7: 31.18, 0.8: 63.94},
    ("c4-llama-12L", "magnitude"): {0.5: 13.93, 0.6: 17.59, 0.7: 28.60, 0.8: 77.92},
    ("stories260K", "dense"): {0.0: 122.33},
}
TIMING_COLUMNS = ("layer [out, in]", "sparsity", "baseline s", "new s", "new / baseline")


def _model_path(name: str) -> Path:
    """A model directory given as a path, or by its name under ../shared/models."""
    path = Path(name).expanduser()
    return path if path.is_dir() else SHARED / "models" / name


def check_fixtures(parser: argparse.ArgumentParser, models: list[str]) -> None:
    """Stop with a usage error when a model directory or a shared dataset is missing."""
    for name in models:
        if not _model_path(name).is_dir():
            parser.error(f"--models: no model directory {name!r} (nor {_model_path(name)})")
    for path in (WIKITEXT, C4):
        if not path.exists():
            parser.error(f"fixture {path} is missing; ../shared must sit beside the checkout")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["stories260K", "c4-llama-12L"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows from C4")
    parser.add_argument(
        "--c4-documents", type=int, default=1600, help="calibrate on the first N C4 documents"
    )
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--timing-baseline",
        metavar="REV",
        help="also time sparsegpt_prune against svnup/kernels.py of this git revision",
    )
    parser.add_argument(
        "--timing-shapes",
        nargs="+",
        default=["4096x4096", "11008x4096"],
        help="synthetic layers OUTxIN for the kernel timing",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "core.md"
    )
    args = parser.parse_args(argv)
    check_fixtures(parser, args.models)
    if not all(0 < s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.nsamples < 1 or args.seqlen < 2 or args.threads < 0 or args.c4_documents < 1:
        parser.error(
            f"--nsamples and --c4-documents must be >= 1, --seqlen >= 2 and --threads >= 0, "
            f"got {args.nsamples}, {args.c4_documents}, {args.seqlen}, {args.threads}"
        )
    try:
        args.timing_shapes = [tuple(int(n) for n in s.split("x", 1)) for s in args.timing_shapes]
    except ValueError:
        parser.error(f"--timing-shapes must look like 4096x4096, got {args.timing_shapes}")
    if args.timing_baseline:
        try:
            args.baseline_source = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{args.timing_baseline}:svnup/kernels.py"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except subprocess.CalledProcessError as err:
            parser.error(f"--timing-baseline: {err.stderr.strip()}")
    return args


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _perplexity(engine: BlockModel, stream: torch.Tensor, seqlen: int) -> float:
    return stream_perplexity(engine, stream, seqlen, dataset="wikitext2", split="test").ppl


def c4_subset(documents: int) -> Path:
    """The first ``documents`` rows of the shared C4 file, cached (named so it reads as C4)."""
    path = CACHE / f"c4-validation-first{documents}.jsonl"
    if not path.exists():
        with C4.open(encoding="utf-8") as f:
            rows = [line for line in f if line.strip()][:documents]
        if len(rows) < documents:
            raise SystemExit(f"--c4-documents {documents}: {C4} has only {len(rows)} documents")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(rows), encoding="utf-8")
    return path


def _result_row(name, method, sparsity, ppl, prune_seconds, protocol) -> str:
    reference = None
    if protocol == REFERENCE_PROTOCOL:
        reference = REFERENCE.get((name, method), {}).get(round(sparsity, 2))
    return _row(
        name,
        method,
        f"{sparsity:.2f}",
        f"{ppl:.2f}",
        "-" if reference is None else f"{reference:.2f}",
        "-" if reference is None else f"{ppl / reference:.3f}",
        "-" if prune_seconds is None else f"{prune_seconds:.1f}",
    )


def bench_model(name: str, args: argparse.Namespace, emit) -> None:
    """Dense perplexity, then every (sparsity, pruner) from the same dense weights."""
    engine, tokenizer = load_model(_model_path(name))
    stream = eval_stream(tokenizer, str(WIKITEXT), split="test", seqlen=args.seqlen)
    calibration = calibration_samples(
        tokenizer, str(c4_subset(args.c4_documents)), args.nsamples, args.seqlen, seed=SEED
    )
    dense = {key: value.clone() for key, value in engine.model.state_dict().items()}
    protocol = (args.seqlen, args.nsamples, args.c4_documents)
    ppl = _perplexity(engine, stream, args.seqlen)
    emit(_result_row(name, "dense", 0.0, ppl, None, protocol))
    for sparsity in args.sparsities:
        for method in PRUNERS:
            engine.model.load_state_dict(dense)
            start = time.perf_counter()
            prune_model(engine, calibration, [sparsity] * engine.n_blocks, method)
            prune_seconds = time.perf_counter() - start
            ppl = _perplexity(engine, stream, args.seqlen)
            emit(_result_row(name, method, sparsity, ppl, prune_seconds, protocol))


def _load_kernels(source: str, name: str) -> types.ModuleType:
    """A kernels module from its source text (an older revision of svnup/kernels.py)."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def bench_kernel_timing(args: argparse.Namespace, emit, repeats: int = 3) -> None:
    """Best-of-``repeats`` wall time of one sparsegpt_prune call, new kernel vs a git revision.

    A synthetic layer: Gaussian weights and a Hessian from 2 * in correlated Gaussian inputs.
    Runs alternate between the kernels, each on a fresh copy of the Hessian (the timing excludes
    that copy, which the new kernel does not need but the old one made inside).
    """
    baseline = _load_kernels(args.baseline_source, "baseline_kernels")
    for out_features, in_features in args.timing_shapes:
        gen = torch.Generator().manual_seed(SEED)
        mixing = torch.eye(in_features) + torch.randn(in_features, in_features, generator=gen) / 8
        stats = LayerStats(in_features, hessian=True)
        stats.add_batch(torch.randn(2 * in_features, in_features, generator=gen) @ mixing)
        weight = torch.randn(out_features, in_features, generator=gen)
        best = {"baseline": float("inf"), "new": float("inf")}
        for _ in range(repeats):
            for label, kernel in (("baseline", baseline.sparsegpt_prune), ("new", sparsegpt_prune)):
                hessian = stats.hessian.clone()
                start = time.perf_counter()
                kernel(weight, hessian, 0.5)
                best[label] = min(best[label], time.perf_counter() - start)
        emit(
            _row(
                f"[{out_features}, {in_features}]",
                "0.50",
                f"{best['baseline']:.2f}",
                f"{best['new']:.2f}",
                f"{best['new'] / best['baseline']:.2f}",
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
        f"{args.seqlen} tokens; calibration: {args.nsamples} x {args.seqlen} tokens from the "
        f"first {args.c4_documents} documents of {C4.name} (SparseGPT sampling), seed {SEED}",
        "- reference: ../shared/README.md, the reference kernels on the same protocol (Wanda with "
        "its floor count per row); prune s: wall time of the sequential pruner",
        "",
    ]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    if args.timing_baseline:
        for line in (
            f"## sparsegpt_prune wall time: this tree vs `{args.timing_baseline}` (single call)",
            "",
            _row(*TIMING_COLUMNS),
            _row(*("---" for _ in TIMING_COLUMNS)),
        ):
            emit(line)
        bench_kernel_timing(args, emit)
        emit("")
    for line in ("## Perplexity", "", _row(*COLUMNS), _row(*("---" for _ in COLUMNS))):
        emit(line)
    for name in args.models:
        bench_model(name, args, emit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
