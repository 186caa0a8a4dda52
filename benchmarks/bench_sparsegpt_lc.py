"""SparseGPT by svnup against SparseGPT by llm-compressor, on the same data and allocation.

Why: the recipe benchmark once showed llm-compressor's SparseGPT 10% ahead of svnup's on
stories260K. This measures the gap per model and allocation (uniform, and the non-uniform
allocation of bench_recipe.py), with the same calibration windows for both, and checks where
the two part: the fraction of block 0's weights whose pruned/kept state agrees with
llm-compressor's (block 0 sees the same dense inputs in both, so this compares the kernels and
the Hessians, not the error carried from earlier blocks), and the perplexity over several
calibration seeds (how large a difference arises from the choice of windows alone).
``--kernel-revision REV`` adds svnup's pipeline with the SparseGPT kernel of git revision REV,
e.g. the per-row mask kernel that produced the old recipe result; ``--reference-kernel`` adds
svnup's pipeline with the reference repository's SparseGPT algorithm (its threshold rule, its
dead-input diagonal, float32), which separates the kernels' differences from the pipelines';
``--reference-kernel threshold exact`` adds it once more with svnup's exact per-block count in
place of the threshold, which separates the count rule from the rest of the kernel.

Needs llm-compressor in a separate environment (see bench_recipe.py):

    python benchmarks/bench_sparsegpt_lc.py --models stories260K --seeds 0 1 2 \
        --kernel-revision 7313d6d^ --threads 1
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from bench_core import C4, REPO, WIKITEXT, _load_kernels, _model_path, _row
from bench_recipe import _block_sparsity, _oneshot

import svnup.pruning
from svnup import export
from svnup.allocation import allocate
from svnup.data import calibration_samples, eval_stream
from svnup.models import BlockModel, linear_layers, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import prune_model

ALLOCATIONS = ("uniform", "svnup")
COUNT_RULES = ("threshold", "exact")
PRUNERS = ("llm-compressor", "svnup")
COLUMNS = (
    "model",
    "allocation",
    "pruned by",
    "seed",
    "mean sparsity",
    "block-0 agreement",
    "wikitext2 ppl",
    "/ llm-compressor",
    "s",
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["stories260K"])
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS))
    parser.add_argument(
        "--pruned-by",
        nargs="+",
        choices=PRUNERS,
        default=list(PRUNERS),
        help="which tools prune (without llm-compressor the relative columns are left empty)",
    )
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows from C4")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--eval-windows", type=int, default=0, help="first N WikiText-2 windows (0: all)"
    )
    parser.add_argument(
        "--kernel-revision",
        nargs="*",
        default=[],
        metavar="REV",
        help="also prune with svnup's pipeline and the SparseGPT kernel of git revision REV",
    )
    parser.add_argument(
        "--reference-kernel",
        nargs="*",
        choices=COUNT_RULES,
        metavar="RULE",
        help="also prune with svnup's pipeline and the reference repository's SparseGPT algorithm, "
        "once per mask count RULE: threshold (the reference's, the default) or exact (svnup's)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "sparsegpt-llm-compressor-run.md",
        help="one run's table (results/sparsegpt-llm-compressor.md gathers several)",
    )
    args = parser.parse_args(argv)
    for name in args.models:
        if not _model_path(name).is_dir():
            parser.error(f"--models: no model directory {name!r}")
    for path in (WIKITEXT, C4):
        if not path.exists():
            parser.error(f"fixture {path} is missing; ../shared must sit beside the checkout")
    if not 0 < args.target < 1 or args.eval_windows < 0:
        parser.error("--target must lie in (0, 1) and --eval-windows be >= 0")
    try:
        metadata.version("llmcompressor")
    except metadata.PackageNotFoundError:
        parser.error("llm-compressor is missing; see bench_recipe.py's docstring")
    args.kernels = {}
    for rev in args.kernel_revision:
        try:
            source = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{rev}:svnup/kernels.py"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except subprocess.CalledProcessError as err:
            parser.error(f"--kernel-revision: {err.stderr.strip()}")
        args.kernels[f"kernel of {rev}"] = _load_kernels(
            source, "kernels_" + rev.replace("^", "_parent")
        )
    if args.reference_kernel is not None:
        for rule in args.reference_kernel or ["threshold"]:
            label = "reference kernel" + ("" if rule == "threshold" else ", exact count")
            args.kernels[label] = SimpleNamespace(
                sparsegpt_prune=functools.partial(_reference_sparsegpt, rule=rule)
            )
    return args


def _sparsities(engine: BlockModel, allocation: str, target: float) -> list[float]:
    """Uniform, or bench_recipe's SV-NUP mapping of a decreasing importance (earlier blocks
    matter more)."""
    if allocation == "uniform":
        return [target] * engine.n_blocks
    params = np.asarray(engine.block_params(), dtype=np.float64)
    importance = np.arange(engine.n_blocks, 0, -1, dtype=np.float64)
    return allocate("svnup", importance, params, target, (0.0, 0.99), **{"lambda": 0.2}).tolist()


def _block0_zeros(engine: BlockModel) -> dict[str, torch.Tensor]:
    return {name: layer.weight == 0 for name, layer in linear_layers(engine.blocks[0]).items()}


def _reference_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    rule: str = "threshold",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as the reference repository's ``fasterprune`` computes it (unstructured only):
    dead inputs get 1 on the diagonal before the damping mean, and each block's mask is every
    score at or below the sorted one at index floor(s * size), so one more weight plus ties.
    Row-major float32, one column at a time, as the reference; svnup's kernel differs in these
    two rules and in its memory layout. Rule "exact" takes svnup's count instead: the lowest
    round(s * rows * end) - round(s * rows * start) scores of the block."""
    if nm is not None:
        raise ValueError("--reference-kernel prunes unstructured sparsity only")
    w = weight.detach().to(torch.float32, copy=True)
    h = hessian.detach().to(torch.float32, copy=True)
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, block_hinv = w[:, start:end].clone(), hinv[start:end, start:end]
        scores = block.square() / torch.diagonal(block_hinv).square()
        if rule == "exact":
            count = round(sparsity * w.shape[0] * end) - round(sparsity * w.shape[0] * start)
            block_mask = torch.zeros(scores.numel(), dtype=torch.bool, device=w.device)
            block_mask[torch.argsort(scores.flatten(), stable=True)[:count]] = True
            block_mask = block_mask.reshape(scores.shape)
        else:
            threshold = torch.sort(scores.flatten()).values[int(scores.numel() * sparsity)]
            block_mask = scores <= threshold
        errors = torch.zeros_like(block)
        for j in range(end - start):
            errors[:, j] = torch.where(block_mask[:, j], block[:, j], 0.0) / block_hinv[j, j]
            block[:, j:] -= torch.outer(errors[:, j], block_hinv[j, j:])
        block[block_mask] = 0.0
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
        mask[:, start:end] = block_mask
    return w.to(weight.dtype), mask


@contextmanager
def _kernel(module):
    """svnup's pipeline with another module's ``sparsegpt_prune`` (its own where None)."""
    original = svnup.pruning.sparsegpt_prune
    if module is not None:
        svnup.pruning.sparsegpt_prune = module.sparsegpt_prune
    try:
        yield
    finally:
        svnup.pruning.sparsegpt_prune = original


def bench_model(name: str, args: argparse.Namespace, emit, tmp: Path) -> None:
    engine, tokenizer = load_model(_model_path(name))
    stream = eval_stream(tokenizer, str(WIKITEXT), split="test", seqlen=args.seqlen)
    if args.eval_windows:
        stream = stream[:, : args.eval_windows * args.seqlen]
    params = np.asarray(engine.block_params(), dtype=np.float64)
    blocks = export.block_names(engine.family.blocks, engine.n_blocks)
    dense = {key: value.clone() for key, value in engine.model.state_dict().items()}
    for allocation in args.allocations:
        sparsities = _sparsities(engine, allocation, args.target)
        recipe = tmp / f"{allocation}.yaml"
        export.write_recipe(recipe, export.recipe("sparsegpt", sparsities, blocks), [])
        for seed in args.seeds:
            calibration = calibration_samples(
                tokenizer, str(C4), args.nsamples, args.seqlen, seed=seed, split="validation"
            )
            runs = [(by, None) for by in PRUNERS if by in args.pruned_by]
            runs += [(f"svnup, {label}", module) for label, module in args.kernels.items()]
            reference, reference_ppl = None, None
            for by, kernel in runs:
                engine.model.load_state_dict(dense)
                start = time.perf_counter()
                if by == "llm-compressor":
                    _oneshot(engine.model, calibration, recipe)
                else:
                    with _kernel(kernel):
                        prune_model(engine, calibration, sparsities, "sparsegpt")
                seconds = time.perf_counter() - start
                zeros = _block0_zeros(engine)
                measured = _block_sparsity(engine)
                ppl = stream_perplexity(engine, stream, args.seqlen).ppl
                if by == "llm-compressor":
                    reference, reference_ppl = zeros, ppl
                agreement, ratio = "-", "-"
                if reference is not None:
                    agree = sum(int((zeros[k] == reference[k]).sum()) for k in zeros)
                    agreement = f"{agree / sum(v.numel() for v in zeros.values()):.4f}"
                    ratio = f"{ppl / reference_ppl:.3f}"
                emit(
                    _row(
                        Path(name).name,
                        allocation,
                        by,
                        seed,
                        f"{float(np.dot(measured, params) / params.sum()):.4f}",
                        agreement,
                        f"{ppl:.2f}",
                        ratio,
                        f"{seconds:.1f}",
                    )
                )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    windows = f"the first {args.eval_windows}" if args.eval_windows else "all"
    lines = [
        "# SparseGPT: svnup against llm-compressor",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, transformers {metadata.version('transformers')}, "
        f"llm-compressor {metadata.version('llmcompressor')}",
        f"- target {args.target}; svnup allocation: SV-NUP mapping (lambda 0.2) of the "
        "importance n, n-1, ..., 1 (as bench_recipe.py); llm-compressor reads the recipe svnup "
        "writes; both calibrate on the same "
        f"{args.nsamples} x {args.seqlen} C4 windows of the given seed",
        f"- WikiText-2 test perplexity over {windows} non-overlapping windows of {args.seqlen} "
        "tokens; block-0 agreement: fraction of block 0's linear weights that are zero in both "
        "or in neither, against llm-compressor's; s: pruning wall time",
        "",
        _row(*COLUMNS),
        _row(*("---" for _ in COLUMNS)),
    ]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, emit, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
