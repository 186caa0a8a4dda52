"""Dense-model block metrics (OWL, DLP, AlphaPruning) against straightforward implementations of
the published formulas, on random layers and on the real c4-llama-12L with its real activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import C4, C4_LLAMA, needs_shared

from svnup.metrics import alphapruning_alpha, dlp_mean_score, owl_outlier_ratio


def random_block(seed: int, sizes=((24, 16), (16, 24), (40, 16))):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}": (
            torch.randn(out, inp, generator=gen) * (1 + i),
            torch.rand(inp, generator=gen) ** 4 * 100,
        )
        for i, (out, inp) in enumerate(sizes)
    }


def wanda_scores(block) -> np.ndarray:
    """Every weight's |W| * ||x|| of the block, concatenated (as the references do)."""
    return np.concatenate(
        [
            (np.abs(w.double().numpy()) * np.sqrt(c.double().numpy())[None, :]).ravel()
            for w, c in block.values()
        ]
    )


def owl_reference(block, m: float) -> float:
    scores = wanda_scores(block)
    return 100.0 * np.count_nonzero(scores > scores.mean() * m) / scores.size


def hill_alpha_reference(weight: torch.Tensor, bins: int = 100) -> float:
    """AlphaPruning's alpha_peak, written out plainly: for each candidate x_min, a Hill fit of the
    tail and its KS distance; the best fit wins. Candidates end above 1.5 x the histogram peak;
    the reference's lower bound sits on a log10 scale."""
    eigs = sorted(float(v) ** 2 for v in torch.linalg.svdvals(weight.float()))
    eigs_t = torch.tensor(eigs)
    logs = torch.log(eigs_t)
    hist_log = torch.log10(eigs_t)
    counts = torch.histc(hist_log, bins, min=float(hist_log.min()), max=float(hist_log.max()))
    edges = torch.linspace(float(hist_log.min()), float(hist_log.max()), bins + 1)
    peak = 10 ** edges[int(torch.argmax(counts))]
    best_alpha, best_distance = 0.0, 1.0
    first = True
    for i in range(len(eigs) - 1):
        if eigs_t[i] < torch.log10(0.95 * peak):
            continue
        if eigs_t[i] > 1.5 * peak:
            break
        n = len(eigs) - i
        alpha = 1 + n / (float(logs[i:].sum()) - n * float(logs[i]))
        distance = 1.0
        if alpha > 1:
            tail = eigs_t[i:]
            fitted = 1 - (tail / eigs_t[i]) ** (1 - alpha)
            distance = float((fitted - torch.arange(n) / n).abs().max())
        if first or distance < best_distance:
            best_alpha, best_distance, first = alpha, distance, False
    return best_alpha


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [2.0, 5.0, 7.0])
def test_owl_is_one_threshold_over_the_whole_block(seed, m):
    block = random_block(seed)
    assert owl_outlier_ratio(block, m) == pytest.approx(owl_reference(block, m), abs=1e-9)
    per_layer_thresholds = sum(
        np.count_nonzero(s > m * s.mean()) for s in (wanda_scores({k: v}) for k, v in block.items())
    ) / sum(w.numel() for w, _ in block.values())
    assert per_layer_thresholds != pytest.approx(owl_outlier_ratio(block, m) / 100)


@pytest.mark.parametrize("seed", range(5))
def test_dlp_is_the_mean_wanda_score(seed):
    block = random_block(seed)
    assert dlp_mean_score(block) == pytest.approx(wanda_scores(block).mean(), rel=1e-9)


def test_metrics_do_not_depend_on_the_statistics_scale():
    """svnup sums squared inputs over tokens; the references average over sequences."""
    block = random_block(0)
    scaled = {k: (w, c / 2048) for k, (w, c) in block.items()}
    assert owl_outlier_ratio(scaled, 5.0) == owl_outlier_ratio(block, 5.0)
    ratio = dlp_mean_score(scaled) / dlp_mean_score(block)
    assert ratio == pytest.approx(1 / math.sqrt(2048), rel=1e-9)


@pytest.mark.parametrize("shape", [(48, 32), (32, 96), (64, 64)])
def test_alphapruning_alpha_matches_the_plain_procedure(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    # a heavy-tailed spectrum: a random matrix plus a few strong directions
    weight = torch.randn(*shape, generator=gen) * 0.02
    strong = torch.randn(shape[0], 3, generator=gen) @ torch.randn(3, shape[1], generator=gen)
    weight += strong * 0.1
    block = {"w": (weight, None)}
    assert alphapruning_alpha(block) == pytest.approx(hill_alpha_reference(weight), rel=1e-5)
    two = {"a": (weight, None), "b": (weight.T.contiguous() * 3, None)}
    expected = (hill_alpha_reference(weight) + hill_alpha_reference(weight.T * 3)) / 2
    assert alphapruning_alpha(two) == pytest.approx(expected, rel=1e-5)


@needs_shared(C4_LLAMA)
def test_real_model_metrics_match_the_references():
    """c4-llama-12L blocks 0, 5 and 11 with activations of real C4 text."""
    from svnup.calibration import dense_statistics
    from svnup.data import calibration_samples
    from svnup.models import linear_layers, load_model

    engine, tokenizer = load_model(C4_LLAMA)
    ids = calibration_samples(tokenizer, str(C4), nsamples=4, seqlen=128, seed=0)
    stats = dense_statistics(engine, ids)
    for index in (0, 5, 11):
        block = {
            name: (layer.weight.data, stats[index][name])
            for name, layer in linear_layers(engine.blocks[index]).items()
        }
        assert owl_outlier_ratio(block, 5.0) == pytest.approx(owl_reference(block, 5.0), abs=1e-9)
        assert dlp_mean_score(block) == pytest.approx(wanda_scores(block).mean(), rel=1e-9)
        weights = {name: (w, None) for name, (w, _) in block.items()}
        expected = np.mean([hill_alpha_reference(w) for w, _ in weights.values()])
        assert alphapruning_alpha(weights) == pytest.approx(expected, rel=1e-5)
