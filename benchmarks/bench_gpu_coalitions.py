"""GPU benchmark: coalition evaluation on a randomly initialised LLaMA-7B-shaped model.

Why: the coalition jobs are the GPU hours of SV-NUP. Issue 9 asks what one costs on a real GPU at
the scale users run: seconds per coalition, tokens per second, and the fraction of the GPU's bf16
peak that the block forwards reach, for one SWSV window (width 4, 16 coalitions) on 32 sequences
x 2,048 tokens in bf16. The weights are random because the time of a forward does not depend on
their values, and no checkpoint can reach the GPU machine.

    PYTHONPATH=. python3 benchmarks/bench_gpu_coalitions.py \
        --out benchmarks/results/gpu-coalitions.md

It needs only torch and transformers (the GPU machine's image has both). ``--shape tiny`` runs the
same code on a small model in seconds (a CPU smoke run). The FLOP count is the matrix work of
the block forwards (linear layers and causal attention, each multiply-add two FLOPs, attention
over the causal half) plus the output head of each coalition's loss. The peak is an 8192^3 bf16
matrix product measured on the same GPU in the same run; the block forwards alone are timed on
dense blocks, and the whole evaluation (weight swaps, losses) against the same peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from svnup.evaluator import CoalitionEvaluator
from svnup.models import BlockModel, linear_layers

SHAPES = {
    # LLaMA-7B: 32 blocks, hidden 4096, MLP 11008, 32 heads, 32,000-token vocabulary
    "llama-7b": dict(hidden=4096, mlp=11008, blocks=32, heads=32, vocab=32000),
    "tiny": dict(hidden=64, mlp=176, blocks=8, heads=4, vocab=512),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--window", type=int, default=4, help="SWSV window width (2**w coalitions)")
    p.add_argument("--probe-sparsity", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per block forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=None, help="a markdown report (default: stdout)")
    return p.parse_args(argv)


def random_llama(shape: dict, seqlen: int, dtype: torch.dtype, device: str) -> BlockModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["blocks"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=seqlen,
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return BlockModel(model, device=device, offload=False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n^3 matrix product on random data (the mean of ``repeats`` after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def block_flops(shape: dict, tokens: int, seqlen: int) -> float:
    """Matrix FLOPs of one block forward over ``tokens`` tokens in sequences of ``seqlen``."""
    h = shape["hidden"]
    linear = 2 * tokens * (4 * h * h + 3 * h * shape["mlp"])
    attention = 2 * tokens * seqlen * h  # QK^T and AV, 2 FLOPs each, over the causal half
    return linear + attention


def time_dense_blocks(engine: BlockModel, ids: torch.Tensor, device: str, n: int = 4) -> float:
    """Seconds of one dense block forward over ``ids``: the mean of ``n`` after one warm-up."""
    hidden, kwargs = engine.embed(ids)
    with torch.no_grad():
        hidden = engine.forward_block(0, hidden, kwargs)
        _sync(device)
        start = time.perf_counter()
        for index in range(1, n + 1):
            hidden = engine.forward_block(index, hidden, kwargs)
        _sync(device)
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    engine = random_llama(shape, args.seqlen, dtype, args.device)
    engine.batch_size = args.batch_size
    start_block = (shape["blocks"] - args.window) // 2
    window = range(start_block, start_block + args.window)
    probes = {
        b: {
            name: torch.rand(layer.weight.shape, device=args.device) < args.probe_sparsity
            for name, layer in linear_layers(engine.blocks[b]).items()
        }
        for b in window
    }
    ids = torch.randint(0, shape["vocab"], (args.sequences, args.seqlen), device=args.device)
    masks = [subset << start_block for subset in range(1 << args.window)]
    evaluator = CoalitionEvaluator(engine, ids, "prune", probes)

    cuda = args.device.startswith("cuda")
    evaluator.evaluate(masks[:2], lambda *_: None)  # warm-up: kernels, pruned weights
    _sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    seconds: list[float] = []
    stats = evaluator.evaluate(masks, lambda mask, nll, n, s: seconds.append(s))
    _sync(args.device)

    tokens = args.sequences * args.seqlen
    block_seconds = time_dense_blocks(engine, ids, args.device)
    per_block = block_flops(shape, tokens, args.seqlen)
    head = 2 * tokens * shape["hidden"] * shape["vocab"]
    flops = stats.block_forwards * per_block + len(masks) * head
    peak = matmul_peak(args.device, dtype) if cuda else float("nan")
    achieved = flops / stats.seconds
    row = {
        "coalitions": stats.coalitions,
        "block_forwards": stats.block_forwards,
        "naive_block_forwards": stats.naive_block_forwards,
        "seconds": stats.seconds,
        "seconds_per_coalition": stats.seconds / stats.coalitions,
        "tokens_per_second": stats.coalitions * tokens / stats.seconds,
        "tflops_per_second": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "fraction_of_peak": achieved / peak,
        "block_forward_seconds": block_seconds,
        "block_forward_fraction_of_peak": per_block / block_seconds / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(args.device) / 2**30
        if cuda
        else float("nan"),
    }
    device_name = (
        torch.cuda.get_device_name(args.device)
        if cuda
        else platform.processor() or platform.machine()
    )
    lines = [
        "# Coalition evaluation on a GPU: a random LLaMA-7B-shaped model",
        "",
        f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- device: {device_name}; torch {torch.__version__}",
        f"- model: {args.shape} {shape}, {args.dtype}, random weights (seed 0)",
        f"- game: one SWSV window of {args.window} blocks ({window.start}-{window.stop - 1}), "
        f"{len(masks)} coalitions, probe masks at {args.probe_sparsity}; "
        f"{args.sequences} x {args.seqlen} tokens, {args.batch_size} sequences per block forward",
        "",
        "| quantity | value |",
        "| --- | --- |",
        *(f"| {key} | {value:.4g} |" for key, value in row.items()),
        "",
        "Per-coalition seconds (in evaluation order; the first coalitions carry the shared dense "
        "prefix): " + ", ".join(f"{s:.3f}" for s in seconds),
        "",
        "```json",
        json.dumps(row),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
