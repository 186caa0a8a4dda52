"""The search-curve table reads each generation's fitness in order and averages the last few."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_curve.py"


def _script():
    spec = importlib.util.spec_from_file_location("search_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curve_is_in_generation_order_and_the_mean_trails(tmp_path):
    curve = _script()
    history = [{"generation": g, "fitness": f} for g, f in [(2, 0.3), (0, 0.5), (1, 0.4)]]
    path = tmp_path / "s0.7.json"
    path.write_text(json.dumps({"history": history}))
    assert curve.fitness_curve(path) == [0.5, 0.4, 0.3]
    lines = curve.table({"a": [0.5, 0.4, 0.3], "b": [0.6]}, every=2, window=2)
    assert lines[0] == "| generation | a | mean of last 2 | b | mean of last 2 |"
    assert lines[2] == "| 2 | 0.4000 | 0.4500 |  |  |"
    assert lines[3] == "| 3 | 0.3000 | 0.3500 |  |  |"


def test_block_means_leave_out_a_partial_run_and_give_the_change():
    curve = _script()
    assert curve.block_means([4.0, 2.0, 1.0, 2.0, 9.0], 2) == [3.0, 1.5]
    lines = curve.block_table({"a": [4.0, 2.0, 1.0, 2.0, 9.0], "b": [1.0, 1.0]}, 2)
    assert lines[0] == "| generations | a | change | b | change |"
    assert lines[2] == "| 1-2 | 3.0000 |  | 1.0000 |  |"
    assert lines[3] == "| 3-4 | 1.5000 | -50.0% |  |  |"
    assert len(lines) == 4
