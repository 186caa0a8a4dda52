"""The prefix-sharing coalition evaluator equals naive full forwards, and resumes from its store."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import STORIES, WIKITEXT, build_tiny_llama, needs_shared
from torch import nn
from transformers import AutoModelForCausalLM

from svnup.calibration import (
    dense_statistics,
    load_probe,
    probe_masks,
    save_probe,
    sparsegpt_probe,
)
from svnup.evaluator import CoalitionEvaluator
from svnup.models import BlockModel, linear_layers, load_model
from svnup.pruning import prune_model
from svnup.store import CoalitionRecord, CoalitionStore

N_BLOCKS = 6
WINDOW = range(1, 5)
WINDOW_MASKS = [k << WINDOW.start for k in range(1 << len(WINDOW))]
SCATTERED = [0b100000, 0b100001, 0b010101, 0b101010, 0b111111]


@pytest.fixture(scope="module")
def tiny6_path(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-6"), layers=N_BLOCKS)


def _ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _probes(engine: BlockModel, calibration: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    return dict(enumerate(probe_masks(engine, dense_statistics(engine, calibration), 0.5)))


@pytest.fixture(scope="module")
def tiny6(tiny6_path):
    engine, _ = load_model(tiny6_path, with_tokenizer=False, batch_size=4)
    return engine, _probes(engine, _ids(8, 32, seed=1))


@torch.no_grad()
def _naive_logits(model: nn.Module, ids: torch.Tensor, mask: int, ablation: str, probes):
    """Logits of a plain HF forward with the blocks of ``mask`` ablated."""
    layers = model.model.layers
    dense = {}
    ablated = [b for b in range(len(layers)) if (mask >> b) & 1]
    if ablation == "skip":
        model.model.layers = nn.ModuleList([m for b, m in enumerate(layers) if b not in ablated])
    else:
        for b in ablated:
            for name, layer in linear_layers(layers[b]).items():
                dense[b, name] = layer.weight.data.clone()
                layer.weight.data.masked_fill_(probes[b][name], 0)
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        model.model.layers = layers
        for (b, name), weight in dense.items():
            linear_layers(layers[b])[name].weight.data.copy_(weight)


def _naive_nll(model: nn.Module, ids: torch.Tensor, mask: int, ablation: str, probes) -> float:
    """Summed next-token NLL of a plain HF forward with the blocks of ``mask`` ablated."""
    logits = _naive_logits(model, ids, mask, ablation, probes)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float(nll.double().sum())


def _evaluate(evaluator: CoalitionEvaluator, masks) -> tuple[dict[int, float], object]:
    results: dict[int, float] = {}

    def on_result(mask, nll_sum, n_tokens, seconds):
        assert mask not in results and n_tokens == evaluator.n_tokens and seconds >= 0
        results[mask] = nll_sum

    return results, evaluator.evaluate(masks, on_result)


def trie_forwards(masks, n_blocks: int, skip: bool) -> int:
    """Block forwards of a prefix trie: one per distinct prefix 0..b, none for skipped blocks."""
    total = 0
    for b in range(n_blocks):
        prefixes = {m & ((2 << b) - 1) for m in masks}
        total += sum(1 for p in prefixes if not (skip and (p >> b) & 1))
    return total


def _snapshot(model: nn.Module) -> list[tuple[int, int, torch.Tensor]]:
    return [(id(p), p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def _assert_restored(model: nn.Module, snapshot) -> None:
    now = list(model.parameters())
    assert len(now) == len(snapshot)
    for p, (ident, ptr, value) in zip(now, snapshot, strict=True):
        assert id(p) == ident and p.data_ptr() == ptr and torch.equal(p, value)


@pytest.mark.parametrize("ablation", ["prune", "skip"])
def test_tiny_llama_matches_naive_forwards(tiny6_path, tiny6, ablation):
    engine, probes = tiny6
    reference = AutoModelForCausalLM.from_pretrained(tiny6_path).eval()
    ids = _ids(6, 24, seed=2)
    masks = WINDOW_MASKS + SCATTERED
    evaluator = CoalitionEvaluator(engine, ids, ablation, probes if ablation == "prune" else None)
    snapshot = _snapshot(engine.model)
    results, stats = _evaluate(evaluator, masks)
    _assert_restored(engine.model, snapshot)

    assert sorted(results) == sorted(masks) and stats.coalitions == len(masks)
    for mask in masks:
        expected = _naive_nll(reference, ids, mask, ablation, probes)
        assert results[mask] == pytest.approx(expected, rel=1e-5), f"mask {mask:#08b}"
    assert len(set(results.values())) == len(masks)  # every ablation changes the loss

    skip = ablation == "skip"
    assert stats.block_forwards == trie_forwards(masks, N_BLOCKS, skip)
    assert stats.block_forwards < stats.naive_block_forwards
    naive = sum(N_BLOCKS - (bin(m).count("1") if skip else 0) for m in masks)
    assert stats.naive_block_forwards == naive


@pytest.mark.parametrize("ablation", ["prune", "skip"])
def test_dense_targets_measure_kl_to_the_dense_model(tiny6_path, tiny6, ablation):
    """targets="dense": each coalition's loss exceeds the all-dense one by its summed KL
    divergence from the dense model's next-token distributions (F.kl_div of naive forwards)."""
    engine, probes = tiny6
    reference = AutoModelForCausalLM.from_pretrained(tiny6_path).eval()
    ids = _ids(5, 20, seed=4)
    masks = [0, *SCATTERED]
    evaluator = CoalitionEvaluator(engine, ids, ablation, probes, targets="dense")
    results, stats = _evaluate(evaluator, masks)

    dense = F.log_softmax(_naive_logits(reference, ids, 0, ablation, probes)[:, :-1].double(), -1)
    entropy = float(-(dense.exp() * dense).sum())
    assert results[0] == pytest.approx(entropy, rel=1e-5)
    for mask in SCATTERED:
        logits = _naive_logits(reference, ids, mask, ablation, probes)[:, :-1].double()
        kl = F.kl_div(F.log_softmax(logits, -1), dense, log_target=True, reduction="sum")
        # float32 logits: the difference of two sums of ~100 nats keeps about 1e-6 nats
        assert results[mask] - results[0] == pytest.approx(float(kl), abs=2e-5), f"{mask:#08b}"
        assert float(kl) > 0
    # One dense pass for the targets, then the trie.
    trie = trie_forwards(masks, N_BLOCKS, ablation == "skip")
    assert stats.block_forwards == N_BLOCKS + trie


def test_cached_dense_targets_change_no_result(tiny6):
    """The dense distributions kept for the job (budget permitting) give exactly the losses of
    recomputing them for each coalition, and the cache is used only when it fits."""
    engine, probes = tiny6
    ids = _ids(5, 20, seed=4)
    masks = [0, *SCATTERED]
    per_coalition = CoalitionEvaluator(
        engine, ids, "prune", probes, "dense", reference_cache_bytes=0
    )
    cached = CoalitionEvaluator(engine, ids, "prune", probes, "dense")
    recomputed, _ = _evaluate(per_coalition, masks)
    kept, _ = _evaluate(cached, masks)
    assert kept == recomputed
    assert per_coalition._reference_probs is None and per_coalition._reference is not None
    assert cached._reference is None
    assert sum(p.numel() for p in cached._reference_probs) == cached.n_tokens * engine.vocab_size


def test_unknown_targets_raise(tiny6):
    engine, probes = tiny6
    with pytest.raises(ValueError, match="unknown targets 'tokens'; choose one of text, dense"):
        CoalitionEvaluator(engine, _ids(2, 8, seed=3), "prune", probes, targets="tokens")


@pytest.mark.parametrize(("ablation", "expected"), [("prune", 47), ("skip", 32)])
def test_window_block_forwards_follow_the_trie(tiny6, ablation, expected):
    """A window of 4 in 6 blocks: one dense forward of block 0, then 2, 4, 8, 16, 16 prefixes;
    skipping drops the forwards of the half that ablates each block."""
    engine, probes = tiny6
    evaluator = CoalitionEvaluator(engine, _ids(2, 8, seed=3), ablation, probes)
    _, stats = _evaluate(evaluator, WINDOW_MASKS)
    assert stats.block_forwards == trie_forwards(WINDOW_MASKS, N_BLOCKS, ablation == "skip")
    assert stats.block_forwards == expected
    assert stats.naive_block_forwards == (96 if ablation == "prune" else 96 - 32)
    assert stats.forward_ratio == stats.naive_block_forwards / expected


def test_resume_after_a_kill_evaluates_only_the_missing(tmp_path, tiny6):
    engine, probes = tiny6
    evaluator = CoalitionEvaluator(engine, _ids(4, 16, seed=4), "prune", probes)
    masks = WINDOW_MASKS + SCATTERED
    one_shot, _ = _evaluate(evaluator, masks)
    store = CoalitionStore(tmp_path, N_BLOCKS, {"model": "tiny6", "ablation": "prune"})
    snapshot = _snapshot(engine.model)

    killed_after, done = 7, []
    with pytest.raises(KeyboardInterrupt), store.writer("window-1") as writer:

        def append_then_die(mask, nll_sum, n_tokens, seconds):
            writer.append(mask, CoalitionRecord(nll_sum, n_tokens, seconds))
            done.append(mask)
            if len(done) == killed_after:
                raise KeyboardInterrupt  # leaves the journal, as a kill would

        evaluator.evaluate(masks, append_then_die)
    _assert_restored(engine.model, snapshot)
    assert store.records(include_journals=False) == {}
    first = set(store.records())
    assert first == set(done) and len(first) == killed_after

    todo = store.missing(masks)
    assert set(todo) == set(masks) - first
    calls = []
    with store.writer("window-1") as writer:

        def append(mask, nll_sum, n_tokens, seconds):
            calls.append(mask)
            writer.append(mask, CoalitionRecord(nll_sum, n_tokens, seconds))

        evaluator.evaluate(todo, append)
    assert sorted(calls) == sorted(todo) and len(calls) == len(masks) - killed_after

    published = store.records(include_journals=False)
    assert sorted(published) == sorted(masks)
    assert {m: r.nll_sum for m, r in published.items()} == one_shot
    assert {r.n_tokens for r in published.values()} == {evaluator.n_tokens}


@pytest.mark.parametrize("mask", [1 << N_BLOCKS, -1, (1 << N_BLOCKS + 3) | 1])
def test_masks_beyond_the_model_raise_before_work(tiny6, mask):
    engine = tiny6[0]
    evaluator = CoalitionEvaluator(engine, _ids(2, 8, seed=5), "skip")
    with pytest.raises(ValueError, match=f"coalition mask {mask:#x} is outside 0 .. 2\\*\\*6 - 1"):
        evaluator.evaluate([0, 3, mask], lambda *args: pytest.fail("evaluated a coalition"))


def test_prune_needs_a_probe_for_every_ablated_block(tiny6):
    engine, probes = tiny6
    partial = {b: probes[b] for b in (0, 1)}
    evaluator = CoalitionEvaluator(engine, _ids(2, 8, seed=5), "prune", partial)
    with pytest.raises(ValueError, match=r"no probe for block\(s\) \[2, 5\]"):
        evaluator.evaluate([0b11, 0b100, 0b100001], lambda *args: pytest.fail("evaluated"))
    with pytest.raises(ValueError, match="ablation 'prune' needs probes"):
        CoalitionEvaluator(engine, _ids(2, 8, seed=5), "prune")
    with pytest.raises(ValueError, match="unknown ablation 'drop'; choose one of prune, skip"):
        CoalitionEvaluator(engine, _ids(2, 8, seed=5), "drop", probes)


def test_sparsegpt_probe_is_sparsegpt_of_each_block_alone(tiny6_path):
    """Block b's SparseGPT probe is what the sequential pruner makes of block b when it prunes
    only that block (every earlier block dense, so its inputs are the dense ones), and a coalition
    that ablates b with it scores that pruned model's loss."""
    calibration, ids = _ids(8, 32, seed=6), _ids(3, 24, seed=7)
    engine, _ = load_model(tiny6_path, with_tokenizer=False, batch_size=4)
    probes = dict(enumerate(sparsegpt_probe(engine, calibration, 0.6)))
    assert sorted(probes) == list(range(N_BLOCKS))
    evaluator = CoalitionEvaluator(engine, ids, "prune", probes)
    results, _ = _evaluate(evaluator, [1 << b for b in (0, 3, 5)])
    for b in (0, 3, 5):
        pruned, _ = load_model(tiny6_path, with_tokenizer=False, batch_size=4)
        prune_model(
            pruned, calibration, [0.6 if i == b else 0.0 for i in range(N_BLOCKS)], "sparsegpt"
        )
        expected = linear_layers(pruned.blocks[b])
        for name, weight in probes[b].items():
            assert weight.dtype == torch.float32
            torch.testing.assert_close(weight, expected[name].weight.data, rtol=0, atol=1e-6)
            dense = linear_layers(engine.blocks[b])[name].weight.data
            assert not torch.equal(weight[weight != 0], dense[weight != 0])  # reconstructed
        assert results[1 << b] == pytest.approx(
            _naive_nll(pruned.model, ids, 0, "prune", {}), rel=1e-5
        )


def test_probe_file_round_trip(tmp_path, tiny6_path, tiny6):
    """Masks come back as masks and rewritten weights as weights, for the blocks asked for."""
    engine, masks = tiny6
    weights = list(sparsegpt_probe(engine, _ids(4, 16, seed=8), 0.5))
    mixed = [masks[0], weights[1], masks[2], weights[3]]
    save_probe(tmp_path / "probe.h5", iter(mixed), {"spec": {"pruner": "test"}})
    loaded, meta = load_probe(tmp_path / "probe.h5", {1, 2})
    assert sorted(loaded) == [1, 2] and meta == {"spec": {"pruner": "test"}}
    for b in (1, 2):
        for name, tensor in mixed[b].items():
            assert loaded[b][name].dtype == tensor.dtype and torch.equal(loaded[b][name], tensor)


@needs_shared(STORIES)
@needs_shared(WIKITEXT)
@pytest.mark.parametrize("ablation", ["prune", "skip"])
def test_stories260k_all_coalitions_match_naive_forwards(ablation):
    from svnup.data import load_texts

    engine, tokenizer = load_model(STORIES)
    text = "\n\n".join(load_texts(str(WIKITEXT), "test")[:400])
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : 16 * 64].view(16, 64)
    evaluation, calibration = ids[:8], ids[8:]
    probes = _probes(engine, calibration) if ablation == "prune" else None
    masks = list(range(1 << engine.n_blocks))
    snapshot = _snapshot(engine.model)
    results, stats = _evaluate(CoalitionEvaluator(engine, evaluation, ablation, probes), masks)
    _assert_restored(engine.model, snapshot)

    reference = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    for mask in masks:
        expected = _naive_nll(reference, evaluation, mask, ablation, probes)
        assert results[mask] == pytest.approx(expected, rel=1e-5), f"mask {mask:#07b}"
    assert stats.block_forwards == trie_forwards(masks, engine.n_blocks, ablation == "skip")
    assert stats.block_forwards < stats.naive_block_forwards
