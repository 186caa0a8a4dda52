"""The GPU benchmark script runs end to end (on the CPU, at a tiny shape), so it works the day a
session is lent a GPU."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_coalitions.py"


def test_gpu_benchmark_runs_at_tiny_shape(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu_coalitions", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    args = ["--shape", "tiny", "--sequences", "2", "--seqlen", "32", "--device", "cpu"]
    assert bench.main([*args, "--out", str(out)]) == 0
    text = out.read_text()
    row = json.loads(text.split("```json\n")[1].split("\n```")[0])
    # 8 blocks, the window in the middle (blocks 2-5). The trie: 2 shared dense blocks,
    # 2 + 4 + 8 + 16 inside the window, then blocks 6-7 for each of the 16 coalitions.
    assert row["coalitions"] == 16
    assert row["block_forwards"] == 2 + 30 + 16 * 2
    assert row["naive_block_forwards"] == 16 * 8
    assert row["tokens_per_second"] > 0 and row["seconds_per_coalition"] > 0
