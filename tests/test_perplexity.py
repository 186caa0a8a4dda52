"""Perplexity matches a window-by-window implementation of the reference formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import STORIES, WIKITEXT, needs_shared

from svnup.data import eval_stream
from svnup.models import load_model
from svnup.perplexity import stream_perplexity


def _reference_ppl(model, stream, seqlen):
    """The loop of the SparseGPT/Wanda reference code: one window per forward."""
    n = stream.shape[1] // seqlen
    total = 0.0
    for i in range(n):
        window = stream[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logits = model(window).logits
        loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:])
        total += loss.item() * seqlen
    return math.exp(total / (n * seqlen)), n


@pytest.mark.parametrize("fixture", ["tiny_llama_path", "tiny_opt_path"])
def test_matches_window_by_window_reference(fixture, request):
    engine, _ = load_model(request.getfixturevalue(fixture), batch_size=3, with_tokenizer=False)
    stream = torch.randint(0, 96, (1, 32 * 7 + 5), generator=torch.Generator().manual_seed(0))
    result = stream_perplexity(engine, stream, 32, dataset="random", windows_per_pass=4)
    ref, n = _reference_ppl(engine.model, stream, 32)
    assert result.windows == n == 7 and result.tokens == 7 * 32
    assert result.ppl == pytest.approx(ref, rel=1e-5)


def test_too_short_stream_is_an_error(tiny_llama_path):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    with pytest.raises(ValueError, match="fewer than seqlen=64"):
        stream_perplexity(engine, torch.zeros(1, 10, dtype=torch.long), 64)


@pytest.mark.slow
@needs_shared(STORIES)
@needs_shared(WIKITEXT)
def test_stories260k_wikitext2_dense_perplexity(tmp_path):
    """Recorded figure: 122.3344 (independently measured 122.33 on 1,591 windows)."""
    engine, tokenizer = load_model(STORIES, batch_size=64)
    stream = eval_stream(tokenizer, str(WIKITEXT / "test.jsonl"), seqlen=512, cache_dir=tmp_path)
    result = stream_perplexity(engine, stream, 512, dataset="wikitext2", windows_per_pass=512)
    assert result.windows == 1591
    assert result.ppl == pytest.approx(122.3344, abs=2e-3)


@needs_shared(STORIES)
@needs_shared(WIKITEXT)
def test_first_windows_only(tmp_path):
    """``windows`` keeps the first N windows of the stream, the study protocol's subset."""
    from svnup.perplexity import dataset_perplexity

    engine, tokenizer = load_model(STORIES, batch_size=64)
    source = str(WIKITEXT / "test.jsonl")
    result = dataset_perplexity(
        engine, tokenizer, source, seqlen=512, windows=3, cache_dir=tmp_path
    )
    stream = eval_stream(tokenizer, source, seqlen=512, cache_dir=tmp_path)[:, : 3 * 512]
    ref, n = _reference_ppl(engine.model, stream, 512)
    assert result.windows == n == 3
    assert result.ppl == pytest.approx(ref, rel=1e-5)
