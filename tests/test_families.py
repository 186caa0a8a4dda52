"""Gemma 2, Gemma 3 and Phi-3 through the stages: pruning, coalition evaluation, block count."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import model_nll, random_ids

from svnup import config as cfg
from svnup.calibration import dense_statistics, probe_masks
from svnup.evaluator import CoalitionEvaluator
from svnup.models import linear_layers, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import prune_model

NEW_FAMILIES = ["tiny_gemma2_path", "tiny_gemma3_text_path", "tiny_gemma3_path", "tiny_phi3_path"]


@pytest.mark.parametrize("fixture", ["tiny_gemma2_path", "tiny_gemma3_path"])
def test_perplexity_is_the_models_own(fixture, request):
    """Windows of 16 tokens, 4 times the sliding window; soft-capped logits in Gemma 2."""
    engine, _ = load_model(request.getfixturevalue(fixture), batch_size=2, with_tokenizer=False)
    windows = random_ids(96, n=5, seqlen=16)
    result = stream_perplexity(engine, windows.reshape(1, -1), 16, windows_per_pass=3)
    mean_nll = float(model_nll(engine.model, windows).sum()) / (5 * 15)
    assert result.windows == 5 and result.ppl == pytest.approx(math.exp(mean_nll), rel=1e-6)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("fixture", NEW_FAMILIES)
def test_pruning_runs_and_the_pruned_blocks_still_reproduce_the_model(fixture, method, request):
    engine, _ = load_model(request.getfixturevalue(fixture), batch_size=3, with_tokenizer=False)
    reports = prune_model(engine, random_ids(96, n=4, seqlen=16), [0.5] * engine.n_blocks, method)
    for block, report in zip(engine.blocks, reports, strict=True):
        assert [layer.name for layer in report.layers] == list(linear_layers(block))
        assert report.sparsity == pytest.approx(0.5, abs=0.01)
        assert all(0 < layer.relative_error < 1 for layer in report.layers)
    ids = random_ids(96, n=3, seqlen=16)
    hidden, kwargs = engine.embed(ids)
    nll = engine.sequence_nll(engine.forward_blocks(hidden, kwargs), ids)
    torch.testing.assert_close(nll, model_nll(engine.model, ids), rtol=1e-5, atol=1e-5)


def test_phi3_fused_projections_are_pruning_targets(tiny_phi3_path):
    engine, _ = load_model(tiny_phi3_path, with_tokenizer=False)
    layers = linear_layers(engine.blocks[0])
    assert set(layers) == {
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "mlp.gate_up_proj",
        "mlp.down_proj",
    }
    # qkv: (4 query + 2 + 2 KV heads) x 8 rows of 32; gate_up: 2 x 64 rows of 32
    assert engine.block_params()[0] == 64 * 32 + 32 * 32 + 128 * 32 + 32 * 64


@pytest.mark.parametrize("fixture", NEW_FAMILIES)
def test_coalitions_equal_the_models_own_forward(fixture, request):
    """The empty coalition is the dense NLL; coalition {1} is the model with block 1 pruned."""
    engine, _ = load_model(request.getfixturevalue(fixture), batch_size=2, with_tokenizer=False)
    ids = random_ids(96, n=3, seqlen=16)
    masks = dict(enumerate(probe_masks(engine, dense_statistics(engine, ids), 0.5)))
    results = {}
    CoalitionEvaluator(engine, ids, "prune", masks).evaluate(
        [0, 0b10], lambda mask, nll, n_tokens, seconds: results.__setitem__(mask, nll)
    )
    assert results[0] == pytest.approx(float(model_nll(engine.model, ids).sum()), rel=1e-6)
    for name, layer in linear_layers(engine.blocks[1]).items():
        layer.weight.data.masked_fill_(masks[1][name], 0)
    assert results[0b10] == pytest.approx(float(model_nll(engine.model, ids).sum()), rel=1e-6)
    assert results[0b10] != pytest.approx(results[0], rel=1e-4)


@pytest.mark.parametrize("fixture", [*NEW_FAMILIES, "tiny_llama_path", "tiny_opt_path"])
def test_config_block_count_matches_the_engine(fixture, request):
    """Read before any job runs, from the nested text config of multimodal Gemma 3."""
    path = request.getfixturevalue(fixture)
    engine, _ = load_model(path, with_tokenizer=False)
    assert cfg.n_blocks({"path": str(path)}) == engine.n_blocks
