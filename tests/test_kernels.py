"""Per-layer pruning kernels: exact sparsity, N:M validity, dtypes, Hessians, real activations."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import STORIES, WIKITEXT, needs_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from svnup.kernels import LayerStats, magnitude_mask, parse_nm, sparsegpt_prune, wanda_mask

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]


def _problem(rows: int, cols: int, seed: int, device: str = "cpu"):
    """Random weight plus correlated inputs, their Hessian and column norms."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    inputs = torch.randn(2 * cols + 8, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)
    stats = LayerStats(cols, hessian=True)
    stats.add_batch(inputs)
    return weight.to(device), inputs.to(device), stats.hessian.to(device), stats.col_norm_sq


def _all_masks(weight, hessian, col_norm_sq, sparsity, nm=None, blocksize=128):
    pruned, sgpt = sparsegpt_prune(weight, hessian, sparsity, nm, blocksize=blocksize)
    return {
        "magnitude": magnitude_mask(weight, sparsity, nm),
        "wanda": wanda_mask(weight, col_norm_sq, sparsity, nm),
        "sparsegpt": sgpt,
    }, pruned


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 4:8 ") == (4, 8)
    assert parse_nm(None) is None
    for bad in ["2-4", "4:2", "0:4", "4:4", "a:b", "2:4:8", "", "-1:4"]:
        with pytest.raises(ValueError, match="nm pattern"):
            parse_nm(bad)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 48),
    sparsity=st.floats(0.0, 0.95),
    blocksize=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_unstructured_counts_are_exact(rows, cols, sparsity, blocksize, seed):
    weight, _, hessian, col_norm_sq = _problem(rows, cols, seed)
    k = round(sparsity * cols)
    masks, pruned = _all_masks(weight, hessian, col_norm_sq, sparsity, blocksize=blocksize)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == weight.shape, name
        assert mask.sum(dim=1).tolist() == [k] * rows, name
        assert int(mask.sum()) == k * rows, name
    assert torch.all(pruned[masks["sparsegpt"]] == 0)
    # The cumulative per-row quota holds at every block end, not only at the last column.
    for end in range(blocksize, cols, blocksize):
        prefix = masks["sparsegpt"][:, :end].sum(dim=1)
        assert prefix.tolist() == [round(sparsity * end)] * rows


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_magnitude_and_wanda_prune_the_lowest_scores_of_each_row(rows, cols, seed):
    weight, _, _, col_norm_sq = _problem(rows, cols, seed)
    scores = {
        "magnitude": (magnitude_mask(weight, 0.5), weight.abs()),
        "wanda": (wanda_mask(weight, col_norm_sq, 0.5), weight.abs() * col_norm_sq.sqrt()),
    }
    for name, (mask, score) in scores.items():
        for row in range(rows):
            pruned, kept = score[row][mask[row]], score[row][~mask[row]]
            if pruned.numel() and kept.numel():
                assert pruned.max() <= kept.min(), name


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [128, 6])
def test_nm_masks_are_valid(pattern, blocksize):
    n, m = parse_nm(pattern)
    weight, _, hessian, col_norm_sq = _problem(5, 48, seed=3)
    masks, pruned = _all_masks(weight, hessian, col_norm_sq, None, (n, m), blocksize=blocksize)
    for name, mask in masks.items():
        groups = mask.reshape(5, 48 // m, m).sum(dim=-1)
        assert torch.all(groups == n), name
    assert torch.all(pruned[masks["sparsegpt"]] == 0)
    # Spelling the matching sparsity out gives the same mask.
    assert torch.equal(magnitude_mask(weight, n / m, (n, m)), masks["magnitude"])


def test_nm_argument_errors():
    weight, _, hessian, col_norm_sq = _problem(2, 16, seed=0)
    with pytest.raises(ValueError, match="contradicts nm 2:4"):
        magnitude_mask(weight, 0.7, (2, 4))
    with pytest.raises(ValueError, match="contradicts nm 2:4"):
        wanda_mask(weight, col_norm_sq, 0.25, (2, 4))
    with pytest.raises(ValueError, match="contradicts nm 2:4"):
        sparsegpt_prune(weight, hessian, 0.6, (2, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        magnitude_mask(weight[:, :12], None, (4, 8))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan, None])
def test_bad_sparsity_names_the_value(sparsity):
    weight, _, hessian, col_norm_sq = _problem(2, 8, seed=0)
    pattern = re.escape(repr(sparsity))
    with pytest.raises(ValueError, match=pattern):
        magnitude_mask(weight, sparsity)
    with pytest.raises(ValueError, match=pattern):
        wanda_mask(weight, col_norm_sq, sparsity)
    with pytest.raises(ValueError, match=pattern):
        sparsegpt_prune(weight, hessian, sparsity)


def test_shape_errors():
    weight, _, hessian, col_norm_sq = _problem(3, 8, seed=0)
    with pytest.raises(ValueError, match="col_norm_sq must have shape"):
        wanda_mask(weight, col_norm_sq[:4], 0.5)
    with pytest.raises(ValueError, match="hessian must have shape"):
        sparsegpt_prune(weight, hessian[:4, :4], 0.5)
    with pytest.raises(ValueError, match="2-D"):
        magnitude_mask(weight[0], 0.5)
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt_prune(weight, -torch.eye(8), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_device_are_preserved(dtype, device):
    weight, _, hessian, col_norm_sq = _problem(6, 32, seed=1, device=device)
    weight = weight.to(dtype)
    masks, pruned = _all_masks(weight, hessian.to(dtype), col_norm_sq.to(dtype), 0.5)
    assert pruned.dtype == dtype and pruned.device == weight.device
    assert torch.all(pruned[masks["sparsegpt"]] == 0)
    assert torch.isfinite(pruned.float()).all()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.device == weight.device, name
        assert mask.sum(dim=1).tolist() == [16] * 6, name
    _, nm_mask = sparsegpt_prune(weight, hessian, None, (2, 4))
    assert torch.all(nm_mask.reshape(6, 8, 4).sum(dim=-1) == 2)


def test_layer_stats_match_direct_computation():
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(3, 5, 12, generator=gen).half(),
        torch.randn(7, 12, generator=gen),
        torch.randn(2, 2, 12, generator=gen).bfloat16(),
    ]
    stats = LayerStats(12, hessian=True)
    light = LayerStats(12, hessian=False)
    for batch in batches:
        stats.add_batch(batch)
        light.add_batch(batch)
    x = torch.cat([b.reshape(-1, 12).double() for b in batches])
    assert stats.n_tokens == light.n_tokens == 26
    assert light.hessian is None
    torch.testing.assert_close(stats.hessian.double(), 2 / 26 * x.T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.col_norm_sq.double(), x.square().sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(light.col_norm_sq, stats.col_norm_sq)
    assert stats.hessian.dtype == stats.col_norm_sq.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        stats.add_batch(torch.randn(4, 10))


def test_sparsity_zero_is_a_no_op():
    weight, _, hessian, col_norm_sq = _problem(4, 16, seed=2)
    weight = weight.half()
    hessian[3, :] = hessian[:, 3] = 0  # a dead input must not be zeroed at sparsity 0
    masks, pruned = _all_masks(weight, hessian, col_norm_sq, 0.0)
    assert torch.equal(pruned, weight) and pruned.dtype == weight.dtype
    for name, mask in masks.items():
        assert not mask.any(), name


def test_sparsegpt_zeroes_dead_inputs_and_compensates():
    weight, inputs, hessian, _ = _problem(4, 16, seed=4)
    hessian[5, :] = hessian[:, 5] = 0
    pruned, mask = sparsegpt_prune(weight, hessian, 0.25, percdamp=0.0)
    assert torch.isfinite(pruned).all()
    assert torch.all(pruned[:, 5] == 0) and torch.all(mask[:, 5])
    assert mask.sum(dim=1).tolist() == [4] * 4
    # Kept weights move (the OBS update), and that beats zeroing the same mask without it.
    assert not torch.equal(pruned[~mask], weight[~mask])
    live = torch.ones(16, dtype=torch.bool)
    live[5] = False
    x = inputs[:, live]
    err_updated = ((pruned - weight)[:, live] @ x.T).square().sum()
    err_plain = ((weight.masked_fill(mask, 0) - weight)[:, live] @ x.T).square().sum()
    assert err_updated < err_plain


def _reference_sparsegpt(weight, hessian, sparsity, nm, blocksize, percdamp=0.01):
    """Textbook sequential OBS in float64: explicit H^-1, downdated after every column.

    After eliminating columns < j, [H^-1]_jj is the OBS denominator of column j and row j of
    H^-1 the update direction; masks are picked with the kernel's per-row block quotas or per
    N:M group, from the weights as updated so far.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    rows_of_hinv, denominators = [], []
    for j in range(cols):
        rows_of_hinv.append(hinv[j].clone())
        denominators.append(hinv[j, j].clone())
        hinv -= torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    d = torch.stack(denominators)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            quota = round(sparsity * end) - round(sparsity * j)
            order = torch.argsort(w[:, j:end].square() / d[j:end], dim=1)
            mask[:, j:end].scatter_(1, order[:, :quota], True)
        if nm is not None and j % nm[1] == 0:
            order = torch.argsort(w[:, j : j + nm[1]].square() / d[j : j + nm[1]], dim=1)
            mask[:, j : j + nm[1]].scatter_(1, order[:, : nm[0]], True)
        coef = torch.where(mask[:, j], w[:, j], 0.0) / d[j]
        w -= torch.outer(coef, rows_of_hinv[j])
        w[mask[:, j], j] = 0.0
    return w, mask


@pytest.mark.parametrize(
    ("sparsity", "nm", "blocksize"),
    [(0.5, None, 8), (0.7, None, 5), (0.3, None, 128), (None, (2, 4), 4), (None, (4, 8), 16)],
)
def test_sparsegpt_matches_sequential_obs_reference(sparsity, nm, blocksize):
    weight, _, hessian, _ = _problem(6, 32, seed=7)
    pruned, mask = sparsegpt_prune(weight, hessian, sparsity, nm, blocksize=blocksize)
    ref_pruned, ref_mask = _reference_sparsegpt(weight, hessian, sparsity, nm, blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pruned.double(), ref_pruned, rtol=1e-4, atol=1e-4)


def test_sparsegpt_with_diagonal_hessian_prunes_lowest_w2_h():
    """With diagonal H, OBS scores reduce to w_j^2 * H_jj and no weight is updated."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 40, generator=gen)
    h = torch.exp(torch.empty(40).uniform_(-4, 4, generator=gen))
    expected = torch.zeros(1, 40, dtype=torch.bool)
    expected[0, torch.argsort(weight[0].square() * h)[:20]] = True
    assert not torch.equal(expected, magnitude_mask(weight, 0.5))  # H changes the choice
    pruned, mask = sparsegpt_prune(weight, torch.diag(h), 0.5, percdamp=0.0)
    assert torch.equal(mask, expected)
    assert torch.equal(pruned[~mask], weight[~mask])


@pytest.fixture(scope="module")
def real_activations():
    """Inputs of a few linear layers of the pretrained stories260K on 8 WikiText windows of 128."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with (WIKITEXT / "validation.jsonl").open() as f:
        text = "\n\n".join(json.loads(line)["text"] for _, line in zip(range(100), f, strict=False))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= 8 * 128
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.4.mlp.gate_proj",
    ]
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args):
            captured[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    handles = [modules[n].register_forward_pre_hook(capture(n)) for n in names]
    with torch.no_grad():
        model(ids[: 8 * 128].reshape(8, 128))
    for handle in handles:
        handle.remove()
    return {n: (modules[n].weight.detach().clone(), captured[n]) for n in names}


@pytest.mark.shared
@needs_shared(STORIES)
@needs_shared(WIKITEXT)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstruction_error_ranks_sparsegpt_wanda_magnitude(real_activations, sparsity):
    for name, (weight, x) in real_activations.items():
        stats = LayerStats(weight.shape[1], hessian=True)
        for chunk in x.split(256):
            stats.add_batch(chunk)
        dense = x @ weight.T

        def rel_error(pruned, dense=dense, x=x):
            return float((dense - x @ pruned.T).square().sum() / dense.square().sum())

        errors = {
            "sparsegpt": rel_error(sparsegpt_prune(weight, stats.hessian, sparsity)[0]),
            "wanda": rel_error(
                weight.masked_fill(wanda_mask(weight, stats.col_norm_sq, sparsity), 0)
            ),
            "magnitude": rel_error(weight.masked_fill(magnitude_mask(weight, sparsity), 0)),
        }
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (name, errors)
