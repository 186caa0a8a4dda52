"""Zero-shot benchmark: lm-evaluation-harness accuracy of dense and uniformly pruned models on a
local multiple-choice task built from WikiText-2 test.

Why: pruning papers report mean zero-shot accuracy next to perplexity; the standard tasks need
downloads, so this benchmark builds one offline from the shared data (pick the true next
sentence of a WikiText-2 passage among four, the three distractors being sentences of other
passages of about the same length) and scores it through the same harness call as the
workflow's zeroshot stage.

    python benchmarks/bench_zeroshot.py --models stories260K benchmarks/.cache/smollm2-135m

smollm2-135m is converted once from the shared GGUF (pip install gguf accelerate):
``python ../shared/tools/gguf_to_hf.py ../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
benchmarks/.cache/smollm2-135m``.
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
from bench_core import C4, WIKITEXT, _model_path, _row, check_fixtures

from svnup.data import calibration_samples, load_texts
from svnup.models import load_model
from svnup.pruning import prune_model
from svnup.zeroshot import continuation_docs, harness_version, write_choice_task, zero_shot_accuracy

TASK = "wikitext2_continuation"
CACHE = Path(__file__).resolve().parent / ".cache" / "tasks"
SEED = 0
COLUMNS = ("model", "method", "sparsity", "acc", "acc stderr", "acc_norm", "prune s", "eval s")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["stories260K"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--pruners", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--docs", type=int, default=500, help="task documents")
    parser.add_argument("--context-sentences", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows from C4")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "zeroshot.md"
    )
    args = parser.parse_args(argv)
    check_fixtures(parser, args.models)
    if harness_version() is None:
        parser.error("lm-evaluation-harness is missing: pip install -e '.[zeroshot]'")
    return args


def build_task(args: argparse.Namespace) -> Path:
    texts = load_texts(str(WIKITEXT), "test")
    docs = continuation_docs(texts, args.docs, 4, SEED, args.context_sentences)
    write_choice_task(CACHE, TASK, docs)
    return CACHE


def bench_model(name: str, tasks: Path, args: argparse.Namespace, emit) -> None:
    """Dense accuracy, then every (sparsity, pruner) from the same dense weights."""
    engine, tokenizer = load_model(_model_path(name))
    calibration = calibration_samples(
        tokenizer, str(C4), args.nsamples, args.seqlen, seed=SEED, split="validation"
    )
    dense = {key: value.clone() for key, value in engine.model.state_dict().items()}
    label = Path(name).name

    def score(method: str, sparsity: float, prune_seconds: float | None) -> None:
        start = time.perf_counter()
        result = zero_shot_accuracy(
            engine.model, tokenizer, [TASK], include_path=tasks, batch_size=args.batch_size
        )
        scored = result["tasks"][TASK]
        emit(
            _row(
                label,
                method,
                f"{sparsity:.2f}",
                f"{scored['acc']:.4f}",
                f"{scored['acc_stderr']:.4f}",
                f"{scored['acc_norm']:.4f}",
                "-" if prune_seconds is None else f"{prune_seconds:.1f}",
                f"{time.perf_counter() - start:.1f}",
            )
        )

    score("dense", 0.0, None)
    for sparsity in args.sparsities:
        for method in args.pruners:
            engine.model.load_state_dict(dense)
            start = time.perf_counter()
            prune_model(engine, calibration, [sparsity] * engine.n_blocks, method)
            score(method, sparsity, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    tasks = build_task(args)
    lines = [
        "# Zero-shot benchmark: pick the true continuation (WikiText-2 test), dense and pruned",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, lm-evaluation-harness {harness_version()}, "
        f"python {platform.python_version()}",
        f"- task: {args.docs} passages of WikiText-2 test; context: up to "
        f"{args.context_sentences} sentences; choices: the next sentence and 3 sentences of other "
        f"passages closest to it in length (svnup.zeroshot.continuation_docs, seed {SEED}); "
        "chance 0.25; zero-shot, scored by lm-evaluation-harness (acc, acc_norm)",
        f"- pruning: uniform, calibration {args.nsamples} x {args.seqlen} tokens from {C4.name}, "
        f"seed {SEED}; prune s: the sequential pruner; eval s: the harness run",
        "",
        _row(*COLUMNS),
        _row(*("---" for _ in COLUMNS)),
    ]
    print("\n".join(lines), flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    for name in args.models:
        bench_model(name, tasks, args, emit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
