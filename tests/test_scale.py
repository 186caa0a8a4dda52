"""What the recommended pipeline needs to run at the size users prune (issue 23): probes stored in
the model's dtype, memory bounded by one block's worth beyond the model, weights memory-mapped
when they exceed the memory a process may use, and the cost model the workflow prints a run's
GPU time from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import h5py
import pytest
import torch
from conftest import build_tiny_llama

from svnup import costs
from svnup.calibration import (
    ProbeFile,
    dense_statistics,
    load_probe,
    probe_masks,
    probe_shapes,
    save_probe,
    sparsegpt_probe,
)
from svnup.evaluator import CoalitionEvaluator
from svnup.kernels import LayerStats
from svnup.models import linear_layers, load_model
from svnup.players import block_masks, make_players
from svnup.pruning import prune_and_score, prune_model
from svnup.shapley import LeaveOneOut, SlidingWindow

REPO = Path(__file__).resolve().parents[1]
BLOCKS = 6


def _ids(n: int, seqlen: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-6"), layers=BLOCKS)


def _halves(engine):
    shapes = [
        {n: tuple(m.weight.shape) for n, m in linear_layers(b).items()} for b in engine.blocks
    ]
    return make_players("halves", shapes, engine.family.attention)


def _loo_masks(n_players: int) -> list[int]:
    return LeaveOneOut(n_players).coalitions()


def _nlls(evaluator, masks) -> dict[int, float]:
    found = {}
    evaluator.evaluate(masks, lambda mask, nll, n, s: found.__setitem__(mask, nll))
    return found


def test_bfloat16_probe_takes_half_the_disk_and_plays_the_same_game(tmp_path, tiny6):
    """A SparseGPT probe of a bfloat16 model keeps its weights in bfloat16: half the values of
    the float32 file of before, which still loads, and bit-identical coalition NLLs."""
    engine, _ = load_model(tiny6, dtype="bfloat16", with_tokenizer=False)
    probes = list(sparsegpt_probe(engine, _ids(8, 32), 0.7))
    assert all(w.dtype == torch.bfloat16 for block in probes for w in block.values())
    save_probe(tmp_path / "bf16.h5", iter(probes), {"spec": {}})
    as_before = [{name: w.float() for name, w in block.items()} for block in probes]
    save_probe(tmp_path / "f32.h5", iter(as_before), {"spec": {}})

    def values_bytes(path):
        with h5py.File(path) as f:
            return sum(f["values"][b][n].nbytes for b in f["values"] for n in f["values"][b])

    assert values_bytes(tmp_path / "bf16.h5") * 2 == values_bytes(tmp_path / "f32.h5")
    new, old = load_probe(tmp_path / "bf16.h5")[0], load_probe(tmp_path / "f32.h5")[0]
    for b in range(BLOCKS):
        for name, weight in probes[b].items():
            assert new[b][name].dtype == torch.bfloat16 and torch.equal(new[b][name], weight)
            assert old[b][name].dtype == torch.float32 and torch.equal(old[b][name], weight.float())
    players = _halves(engine)
    masks = _loo_masks(len(players))
    ids = _ids(4, 32, seed=1)
    games = [
        _nlls(
            CoalitionEvaluator(engine, ids, probes=ProbeFile(tmp_path / f), players=players), masks
        )
        for f in ("bf16.h5", "f32.h5")
    ]
    assert games[0] == games[1] and len(set(games[0].values())) > 1


def test_probe_level_disk_is_the_formula_of_scale_md(tmp_path):
    """One SparseGPT level of a known shape in bfloat16: its kept weights take exactly
    ``costs.probe_bytes``'s values, the file at most the formula plus HDF5's bookkeeping (about
    2 KB a dataset, two datasets a layer)."""
    path = build_tiny_llama(tmp_path / "model", layers=2, hidden_size=128, intermediate_size=352)
    engine, _ = load_model(path, dtype="bfloat16", with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    shape = costs.Shape.from_config(config)
    level = 0.7
    save_probe(tmp_path / "probe.h5", sparsegpt_probe(engine, _ids(4, 16), level), {"spec": {}})
    formula = costs.probe_bytes(shape, level, "sparsegpt", dtype_bytes=2)
    with h5py.File(tmp_path / "probe.h5") as f:
        values = sum(f["values"][b][n].nbytes for b in f["values"] for n in f["values"][b])
    assert values == formula["values"]
    size = (tmp_path / "probe.h5").stat().st_size
    datasets = 2 * shape.blocks * len(shape.layers())
    assert values < size <= formula["values"] + formula["masks"] + 8192 + 2048 * datasets
    assert probe_shapes(tmp_path / "probe.h5")[0] == {
        name: (rows, n) for name, (rows, n) in shape.layers().items()
    }


def test_probe_file_reads_one_block_at_a_time(tmp_path, tiny6):
    engine, _ = load_model(tiny6, with_tokenizer=False)
    masks = probe_masks(engine, dense_statistics(engine, _ids(4, 16)), 0.5)
    save_probe(tmp_path / "p.h5", iter(masks), {"spec": {}})
    probes = ProbeFile(tmp_path / "p.h5")
    assert list(probes) == list(range(BLOCKS)) and BLOCKS - 1 in probes and BLOCKS not in probes
    assert all(torch.equal(probes[3][n], m) for n, m in masks[3].items())
    with pytest.raises(KeyError):
        probes[BLOCKS]


def test_asking_whether_a_probe_file_has_a_block_reads_no_probe(tmp_path, tiny6, monkeypatch):
    """A coalition job checks that every block it ablates has a probe before it starts; the
    check must not read each block's probe (it did, and grew the job's heap by the probes of the
    whole model)."""
    import svnup.calibration

    engine, _ = load_model(tiny6, with_tokenizer=False)
    save_probe(
        tmp_path / "p.h5", iter(probe_masks(engine, dense_statistics(engine, _ids(4, 16)), 0.5)), {}
    )
    probes = ProbeFile(tmp_path / "p.h5")
    reads = []
    read = svnup.calibration._read_block
    monkeypatch.setattr(
        svnup.calibration, "_read_block", lambda f, key: reads.append(key) or read(f, key)
    )
    assert all(b in probes for b in range(BLOCKS)) and BLOCKS not in probes
    assert reads == []
    probes[2]
    assert reads == ["2"]


def test_logits_are_made_a_bounded_chunk_at_a_time_with_the_same_nll(tiny6, monkeypatch):
    """The float32 logits of a chunk take at most the working share of the weights, a chunk
    spans rows where they are short and splits a row where it is long, and the NLL (and the
    cross-entropy to a reference) is that of the whole logits at once."""

    engine, _ = load_model(tiny6, with_tokenizer=False)
    ids = _ids(5, 24, seed=3)
    hidden = engine.forward_blocks(*engine.embed(ids))
    reference = hidden.flip(0)
    with torch.no_grad():
        logits = engine._logits(hidden[:, :-1])
        whole = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        )
        expected = engine._logits(reference[:, :-1]).softmax(-1)
        cross = -(expected * logits.log_softmax(-1)).sum(-1)
    whole, cross = whole.view(5, 23).double().sum(1), cross.double().sum(1)
    monkeypatch.setattr(costs, "WORKING_MIN_BYTES", 0)
    budget = costs.working_bytes(engine.weight_bytes)
    step = engine.logit_chunk_tokens
    assert step * engine.vocab_size * 4 <= budget < (step + 1) * engine.vocab_size * 4
    assert 1 < step < 23  # a row is split: the budget is smaller than one row's logits
    rows = []
    make = engine._logits
    monkeypatch.setattr(engine, "_logits", lambda h: rows.append(h.shape[0]) or make(h))
    nll = engine.sequence_nll(hidden, ids)
    assert max(rows) == step and sum(rows) == 5 * 23
    torch.testing.assert_close(nll, whole, rtol=1e-6, atol=1e-6)
    for chunk in (1, 7, 23, 30, 1000):
        torch.testing.assert_close(engine.sequence_nll(hidden, ids, chunk), whole)
        probs = engine.next_token_probs(reference, ids, chunk)
        torch.testing.assert_close(
            engine.sequence_nll(hidden, ids, chunk, reference_probs=probs), cross
        )
        torch.testing.assert_close(
            engine.sequence_nll(hidden, ids, chunk, reference=reference), cross
        )


def test_an_evaluation_pass_holds_hidden_states_of_a_bounded_size(tiny6, monkeypatch):
    """Perplexity goes through the blocks in passes of whole micro-batches whose hidden states
    fit five working shares of the weights (``costs.eval_pass_windows``), with the perplexity of
    one pass for all."""
    from svnup.perplexity import stream_perplexity

    engine, _ = load_model(tiny6, batch_size=2, with_tokenizer=False)
    stream = _ids(1, 16 * 11, seed=4)
    monkeypatch.setattr(costs, "WORKING_MIN_BYTES", 0)
    per_window = 2 * 16 * engine.model.config.hidden_size * 4
    windows = engine.windows_per_pass(16)
    assert windows % 2 == 0 and windows * per_window <= 0.05 * engine.weight_bytes
    assert 2 <= windows < 11
    passes = []
    embed = engine.embed
    monkeypatch.setattr(engine, "embed", lambda batch: passes.append(len(batch)) or embed(batch))
    bounded = stream_perplexity(engine, stream, 16)
    assert max(passes) == windows and sum(passes) == 11
    assert bounded.ppl == pytest.approx(
        stream_perplexity(engine, stream, 16, windows_per_pass=11).ppl, rel=1e-12
    )


def test_on_a_gpu_the_working_buffers_have_a_larger_floor(tiny6):
    """A small model's working share on a GPU would cut its logits and evaluation passes into
    kernels too small to run at speed; there a buffer takes at least GPU_WORKING_MIN_BYTES,
    on the CPU WORKING_MIN_BYTES, and a large model's 1% either way."""
    engine, _ = load_model(tiny6, batch_size=2, with_tokenizer=False)
    vocab, hidden = engine.vocab_size, engine.model.config.hidden_size
    assert engine.logit_chunk_tokens == costs.WORKING_MIN_BYTES // (vocab * 4)
    cpu_windows = engine.windows_per_pass(16)
    engine.device = torch.device("cuda")  # read only by the bounds; nothing runs on it
    assert engine.logit_chunk_tokens == costs.GPU_WORKING_MIN_BYTES // (vocab * 4)
    per_window = 2 * 16 * hidden * 4
    assert engine.windows_per_pass(16) == costs.GPU_WORKING_MIN_BYTES // (per_window * 2) * 2
    assert engine.windows_per_pass(16) > cpu_windows
    large = 100 * costs.GPU_WORKING_MIN_BYTES / costs.WORKING_SHARE
    for device_type in ("cpu", "cuda"):
        assert costs.working_bytes(large, device_type=device_type) == int(
            costs.WORKING_SHARE * large
        )


def test_leave_one_out_walk_holds_two_sets_of_hidden_states_and_one_pruned_half(tiny6):
    """The dense branch goes on in place, so a leave-one-out game over half-block players holds
    the dense states and one branch's, not one set per block; a player's pruned weights are
    made for its own layers and freed once its coalitions are done, so the job holds at most
    one half-block's."""
    engine, _ = load_model(tiny6, with_tokenizer=False)
    ids = _ids(4, 16)
    probes = dict(enumerate(probe_masks(engine, dense_statistics(engine, ids), 0.5)))
    players = _halves(engine)
    evaluator = CoalitionEvaluator(engine, ids, probes=probes, players=players)
    alive, most = [], {"states": 0, "pruned": 0}
    forward = engine.forward_block
    pruned = evaluator._pruned_weights

    def counting_forward(index, hidden, kwargs):
        out = forward(index, hidden, kwargs)
        alive.append(weakref.ref(out))
        most["states"] = max(most["states"], sum(r() is not None for r in alive))
        return out

    def counting_pruned(index, names):
        weights = pruned(index, names)
        held = sum(w.numel() for block in evaluator._pruned.values() for w in block.values())
        most["pruned"] = max(most["pruned"], held)
        return weights

    engine.forward_block = counting_forward
    evaluator._pruned_weights = counting_pruned
    results = _nlls(evaluator, _loo_masks(len(players)))
    assert len(results) == 2 * BLOCKS + 1
    halves = [players[0].params + players[1].params, players[0].params, players[1].params]
    assert most["states"] <= 3 and most["pruned"] == max(halves[1:]) < halves[0]
    assert not evaluator._pruned


@pytest.mark.parametrize(
    "masks, skip",
    [
        (_loo_masks(2 * BLOCKS), False),
        (SlidingWindow(BLOCKS, 3).coalitions(), False),
        ([0b100000, 0b100001, 0b010101, 0b101010, 0b111111], True),
    ],
)
def test_trie_forwards_count_the_evaluators_block_forwards(tiny6, masks, skip):
    """The planner counts block forwards without torch; they are the evaluator's."""
    engine, _ = load_model(tiny6, with_tokenizer=False)
    ids = _ids(2, 16)
    if skip:
        evaluator, bits = CoalitionEvaluator(engine, ids, ablation="skip"), None
    else:
        probes = dict(enumerate(probe_masks(engine, dense_statistics(engine, ids), 0.5)))
        players = _halves(engine) if max(masks) >= 1 << BLOCKS else None
        evaluator = CoalitionEvaluator(engine, ids, probes=probes, players=players)
        bits = block_masks(players, BLOCKS) if players else None
    stats = evaluator.evaluate(masks, lambda *_: None)
    bits = bits or [1 << b for b in range(BLOCKS)]
    assert costs.trie_forwards(masks, bits, skip=skip) == stats.block_forwards


def test_no_stage_holds_more_than_one_blocks_hessians(monkeypatch, tiny6):
    """Calibration, the SparseGPT probe, pruning and ATP's search each drop a block's Hessians
    before the next block's exist."""
    engine, _ = load_model(tiny6, with_tokenizer=False)
    per_block = len(linear_layers(engine.blocks[0]))
    hessians, most = [], [0]
    original = LayerStats.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.hessian is not None:
            hessians.append(weakref.ref(self.hessian))
            most[0] = max(most[0], sum(r() is not None for r in hessians))

    monkeypatch.setattr(LayerStats, "__init__", tracked)
    ids = _ids(4, 16)
    dense_statistics(engine, ids)
    assert most[0] == 0  # Wanda's statistics need no Hessian
    list(sparsegpt_probe(engine, ids, 0.6))
    assert 0 < most[0] <= per_block
    sparsities = [0.5] * BLOCKS
    prune_and_score(load_model(tiny6, with_tokenizer=False)[0], ids, sparsities, "sparsegpt")
    prune_model(engine, ids, sparsities, method="sparsegpt")
    assert most[0] <= per_block and len(hessians) == 3 * BLOCKS * per_block


def test_probe_masks_show_progress(tiny6, capsys):
    engine, _ = load_model(tiny6, with_tokenizer=False)
    probe_masks(engine, dense_statistics(engine, _ids(2, 16)), 0.5, "magnitude")
    err = capsys.readouterr().err
    assert "magnitude probe 0.5" in err and f"{BLOCKS}/{BLOCKS}" in err


CHILD = """
import json, os, resource, sys
import torch
from svnup import stages
from svnup.models import load_model

torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
load_model(spec["warm"], with_tokenizer=False)  # every import and lazy library before the limit

def data_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

limit = data_bytes() + spec["headroom"]
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
if spec["mapped"] is False:
    load_model(spec["model"], with_tokenizer=False, mapped=False)
engine, _ = load_model(spec["model"], with_tokenizer=False)
print("mapped weights:", len(engine.mapped), flush=True)
del engine
model = {"path": spec["model"], "dtype": "float32"}
runtime = {"device": "cpu", "batch_size": 2}
calibration = {"model": model, "seqlen": 32, "dataset": spec["data"], "nsamples": 2, "seed": 0}
stages.calibrate(calibration, runtime, spec["out"] + "/calibration.h5")
evaluation = {"dataset": spec["data"], "split": "test", "seqlen": 32, "windows": 2}
stages.evaluate(evaluation, runtime, model, spec["model"], spec["out"] + "/eval.json")
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 256 MB float32 checkpoint with a trained tokenizer, a text file, and a tiny model."""
    from svnup.demo import train_tokenizer

    root = tmp_path_factory.mktemp("large")
    words = [f"w{i % 97} x{(i * 7) % 31}" for i in range(4000)]
    texts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = train_tokenizer(texts, 300)
    model = build_tiny_llama(
        root / "model", 6, hidden_size=1024, intermediate_size=2048, vocab_size=len(tokenizer)
    )
    tokenizer.save_pretrained(model)
    return model, root / "text.jsonl", build_tiny_llama(root / "tiny", layers=2)


@pytest.mark.parametrize("mapped", ["auto", False])
def test_weights_larger_than_the_memory_limit_run_memory_mapped(tmp_path, large_checkpoint, mapped):
    """A child process may take 96 MB more than it holds after its imports (RLIMIT_DATA), under
    the 256 MB of weights: calibrate and evaluate run on the weights mapped read-only, which
    the loader chose by itself; loading them into memory, as transformers does, fails."""
    model, data, tiny = large_checkpoint
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    headroom = 96 << 20
    assert weights > 2 * headroom
    spec = {
        "warm": str(tiny),
        "model": str(model),
        "data": str(data),
        "out": str(tmp_path),
        "headroom": headroom,
        "mapped": mapped,
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OPENBLAS_NUM_THREADS": "1",
        "SVNUP_CACHE": str(tmp_path / "tokens"),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if mapped is False:
        assert result.returncode != 0 and "Cannot allocate memory" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"mapped weights: {2 + 6 * 9 + 1}" in result.stdout and "done" in result.stdout
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["ppl"])


@pytest.fixture(scope="module")
def cuda_project(tmp_path_factory) -> Path:
    """The tiny workflow project with the recommended settings on a cuda model (never run:
    only planned for a cluster, which needs no GPU here)."""
    from workflow_fixture import build_project, tiny_config, write_config

    root = build_project(tmp_path_factory.mktemp("cuda-project"))
    config = tiny_config(
        **{
            "models.tiny.device": "cuda",
            "shapley.estimator": "loo",
            "shapley.players": "halves",
            "shapley.probe_pruner": "match",
            "allocation.method": "svnup-fit",
            "targets.allocations": ["svnup-fit", "uniform"],
            "targets.pruners": ["wanda", "sparsegpt"],
        }
    )
    config["allocation"]["svnup-fit"] = {"levels": [0.6, 0.7, 0.8], "floor": 0.05}
    write_config(root, config)
    return root


# Planned as for a cluster, which submits from a login node that may have no GPU: the checks
# before planning refuse a cuda model where jobs would run on this machine without one.
CLUSTER = ("--executor", "slurm", "--jobs", "1")


def _predicted(output: str) -> tuple[int, dict[str, int]]:
    """The job counts of the planner's line: total, and per stage."""
    (line,) = [x for x in output.splitlines() if "predicted GPU time of tiny" in x]
    total = int(line.split("'s ")[1].split()[0])
    stages = line.split("GPU (")[1].split(" min;")[0].split(", ")
    return total, {part.split()[0]: int(part.split()[1]) for part in stages}


@pytest.mark.workflow
def test_predicted_gpu_time_is_printed_once_while_planning(cuda_project):
    """A cuda model's plan is priced before any job runs, from the jobs the dry run plans: one
    line, whose job counts are the plan's; a target that needs fewer jobs prices fewer."""
    from workflow_fixture import planned_jobs, snakemake

    result = snakemake(cuda_project, "--dry-run", "--quiet", "rules", *CLUSTER)
    assert result.stdout.count("predicted GPU time") == 1
    total, stages = _predicted(result.stdout)
    planned = planned_jobs(cuda_project, *CLUSTER)
    expected = {
        "calibrate": planned["calibrate"],
        "probe": planned["probe"],
        "coalitions": planned["coalitions"],
        "prune": planned["prune"],
        "evaluate": planned["evaluate"] + planned["evaluate_dense"],
    }
    assert stages == expected and total == sum(expected.values())
    one = snakemake(
        cuda_project, "results/tiny/s0.5/svnup-fit/wanda/ppl.json", "--dry-run", *CLUSTER
    )
    assert _predicted(one.stdout)[1] == {
        "calibrate": 1,
        "probe": 3,
        "coalitions": 3,
        "prune": 1,
        "evaluate": 1,
    }


@pytest.mark.workflow
def test_svnup_types_is_priced_as_its_probes_and_type_games(cuda_project):
    """svnup-types plays no coalition game: its plan prices one probe and one type game (8
    coalitions) a level, besides pruning and evaluation."""
    from workflow_fixture import planned_jobs, snakemake

    target = "results/tiny/s0.5/svnup-types/sparsegpt/ppl.json"
    planned = planned_jobs(cuda_project, target, *CLUSTER)
    assert planned["type_game"] == 3 and "coalitions" not in planned, planned
    one = snakemake(cuda_project, target, "--dry-run", *CLUSTER)
    assert _predicted(one.stdout)[1] == {
        "calibrate": 1,
        "probe": 3,
        "coalitions": planned["type_game"],
        "prune": 1,
        "evaluate": 1,
    }


def test_planning_imports_no_torch():
    """What the planner's pricing imports leaves torch (seconds to import) alone."""
    code = (
        "import sys; import svnup.costs, svnup.data, svnup.players, svnup.shapley, "
        "svnup.config, svnup.preflight, svnup.registry; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def _gpu_script():
    import importlib.util

    path = REPO / "benchmarks" / "bench_gpu_scale.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_plans_the_reduced_protocol_and_prices_each_job(tmp_path):
    """The GPU script's config is the recommended one at the reduced protocol (a valid config
    the workflow accepts), and each model job it measures is set beside ``svnup.costs``' price
    of that very job. (The whole script ran on the CPU at a tiny shape: scale.md.)"""
    from svnup import config as cfg

    script = _gpu_script()
    args = script._parse(["--out", str(tmp_path / "gpu.md")])
    settings = cfg.validate(script.config(args))
    model = settings["models"]["m"]
    assert (model["device"], model["dtype"], model["seqlen"]) == ("cuda", "bfloat16", 2048)
    assert settings["pruner"] == "wanda" and settings["calibration"]["nsamples"] == 32
    assert settings["shapley"]["eval_samples"] == 8 and settings["evaluation"]["windows"] == 64
    assert settings["shapley"]["players"] == "halves" and settings["shapley"]["estimator"] == "loo"
    shape = script.shapes.scaled("llama-2-7b")
    detail = {"pruner": "wanda", "level": 0.7}
    jobs = [
        {"rule": "calibrate", "detail": {}},
        {"rule": "probe", "detail": detail},
        {"rule": "coalitions", "detail": {**detail, "block_forwards": 1088, "coalitions": 65}},
        {"rule": "prune", "detail": {"pruner": "wanda"}},
        {"rule": "evaluate", "detail": {"windows": 64}},
        {"rule": "shapley", "detail": {}},
    ]
    rows = script.predictions(args, shape, jobs)
    assert [r["rule"] for r in rows] == ["calibrate", "probe", "coalitions", "prune", "evaluate"]
    seven_b = costs.Shape.from_config(shape)
    planned = costs.Job("coalitions", 8, 2048, forwards=1088, coalitions=65)
    assert rows[2]["predicted_s"] == costs.gpu_seconds(planned, seven_b)
    assert rows[2]["flops"] > rows[0]["flops"] > 0


def test_the_gpu_time_is_announced_for_the_models_of_the_requested_outputs():
    assert costs.result_model("results/llama-7b/s0.7/ppl.json") == "llama-7b"
    assert costs.result_model("results/llama-7b") is None  # a folder, not an output of a model
    assert costs.result_model("report/index.html") is None
