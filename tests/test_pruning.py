"""The sequential pruning driver: exact per-layer sparsity, N:M, early errors, pruned inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, WIKITEXT, build_tiny_opt, needs_shared

from svnup.calibration import dense_statistics
from svnup.kernels import wanda_mask
from svnup.models import BlockModel, linear_layers, load_model
from svnup.pruning import ERROR_SEQUENCES, PRUNERS, BlockReport, prune_and_score, prune_model

# A dense block between pruned ones, and a dense last block.
SPARSITIES = {"llama": [0.3, 0.5, 0.7, 0.0], "opt": [0.6, 0.0, 0.4, 0.0]}


@pytest.fixture(scope="module")
def tiny_opt4_path(tmp_path_factory):
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt4"), layers=4)


@pytest.fixture
def paths(tiny_llama_path, tiny_opt4_path):
    return {"llama": tiny_llama_path, "opt": tiny_opt4_path}


def _calibration(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _weights(engine: BlockModel) -> list[dict[str, torch.Tensor]]:
    return [
        {name: layer.weight.detach().clone() for name, layer in linear_layers(block).items()}
        for block in engine.blocks
    ]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method", PRUNERS)
def test_every_layer_gets_its_blocks_sparsity(paths, family, method):
    engine, _ = load_model(paths[family], with_tokenizer=False)
    sparsities = SPARSITIES[family]
    before = _weights(engine)
    reports = prune_model(engine, _calibration(), sparsities, method)

    assert [r.block for r in reports] == list(range(engine.n_blocks))
    for b, (block, report, target) in enumerate(
        zip(engine.blocks, reports, sparsities, strict=True)
    ):
        assert isinstance(report, BlockReport) and report.target == target
        assert report.seconds > 0
        layers = linear_layers(block)
        assert [lr.name for lr in report.layers] == list(layers)
        if target == 0:
            for name, layer in layers.items():
                assert torch.equal(layer.weight, before[b][name]), f"block {b} {name} changed"
            assert report.sparsity == 0
            assert all(lr.relative_error == 0 for lr in report.layers)
            continue
        zeros = 0
        for lr in report.layers:
            weight = layers[lr.name].weight
            # Wanda counts per row; magnitude and SparseGPT per layer (their rows differ).
            expected = round(target * weight.numel())
            if method == "wanda":
                per_row = (weight == 0).sum(dim=1)
                expected = round(target * weight.shape[1])
                assert torch.all(per_row == expected), f"block {b} {lr.name}: {per_row.tolist()}"
                expected *= weight.shape[0]
            assert int((weight == 0).sum()) == expected, f"block {b} {lr.name}"
            assert lr.sparsity == pytest.approx(expected / weight.numel())
            assert 0 < lr.relative_error < 1
            zeros += int((weight == 0).sum())
        total = sum(layer.weight.numel() for layer in layers.values())
        assert report.sparsity == pytest.approx(zeros / total)
        assert report.to_dict()["layers"][0]["name"] == report.layers[0].name


@pytest.mark.parametrize("nm", ["2:4", "4:8"])
@pytest.mark.parametrize("method", PRUNERS)
def test_nm_masks_are_valid(tiny_llama_path, method, nm):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    n, m = (int(p) for p in nm.split(":"))
    prune_model(engine, _calibration(), [n / m] * engine.n_blocks, method, nm=nm)
    for block in engine.blocks:
        for name, layer in linear_layers(block).items():
            groups = (layer.weight == 0).reshape(layer.weight.shape[0], -1, m).sum(dim=-1)
            assert torch.all(groups == n), f"{name}: {groups.unique().tolist()}"


def _no_work(*args, **kwargs):
    pytest.fail("prune_model started work before validating its arguments")


@pytest.mark.parametrize(
    ("sparsities", "method", "nm", "message"),
    [
        ([0.5, 0.5, 0.5], "wanda", None, "got 3 block sparsities for a model with 4 blocks"),
        ([0.5, 0.5, 1.0, 0.5], "wanda", None, r"block sparsity 1.0 is outside \[0, 1\)"),
        ([0.5, -0.1, 0.5, 0.5], "magnitude", None, r"block sparsity -0.1 is outside"),
        ([0.5] * 4, "owl", None, "unknown pruner 'owl'; choose one of magnitude, wanda"),
        ([0.5, 0.5, 0.5, 0.4], "sparsegpt", "2:4", "nm=2:4 needs a uniform sparsity of 0.5"),
        ([0.5] * 4, "wanda", "2-4", "nm pattern must look like 'N:M'"),
    ],
)
def test_bad_arguments_raise_before_any_work(
    tiny_llama_path, monkeypatch, sparsities, method, nm, message
):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    monkeypatch.setattr(engine, "embed", _no_work)
    before = _weights(engine)
    with pytest.raises(ValueError, match=message):
        prune_model(engine, _calibration(), sparsities, method, nm=nm)
    for old, new in zip(before, _weights(engine), strict=True):
        assert all(torch.equal(old[name], new[name]) for name in old)


def _block_masks(engine: BlockModel, index: int) -> dict[str, torch.Tensor]:
    return {name: layer.weight == 0 for name, layer in linear_layers(engine.blocks[index]).items()}


def _wanda_masks(engine: BlockModel, calibration, index: int, sparsity: float):
    """Wanda masks of block ``index`` from statistics gathered through the model as it stands."""
    stats = dense_statistics(engine, calibration)[index]
    layers = linear_layers(engine.blocks[index])
    return {name: wanda_mask(layer.weight, stats[name], sparsity) for name, layer in layers.items()}


def test_later_blocks_see_inputs_of_the_pruned_earlier_blocks(tiny_llama_path):
    calibration = _calibration(16)
    pruned, _ = load_model(tiny_llama_path, with_tokenizer=False)
    prune_model(pruned, calibration, [0.9, 0.5, 0.5, 0.5], "wanda")

    # Reference: the dense model with only block 0 replaced by its pruned version.
    reference, _ = load_model(tiny_llama_path, with_tokenizer=False)
    dense_masks = _wanda_masks(reference, calibration, 1, 0.5)
    for name, layer in linear_layers(reference.blocks[0]).items():
        layer.weight.data.copy_(linear_layers(pruned.blocks[0])[name].weight)
    sequential_masks = _wanda_masks(reference, calibration, 1, 0.5)

    got = _block_masks(pruned, 1)
    assert all(torch.equal(got[name], sequential_masks[name]) for name in got)
    assert any(not torch.equal(got[name], dense_masks[name]) for name in got)


@needs_shared(STORIES)
@needs_shared(WIKITEXT)
def test_stories260k_sparsegpt_has_the_lowest_error():
    """Per block, SparseGPT's mean layer error is below Wanda's and magnitude's. Those two do
    not rank the same way in every block (whole-matrix magnitude wins some)."""
    from svnup.data import calibration_samples

    engine, tokenizer = load_model(STORIES)
    calibration = calibration_samples(
        tokenizer, str(WIKITEXT), nsamples=16, seqlen=128, seed=0, split="validation"
    )
    dense = {k: v.clone() for k, v in engine.model.state_dict().items()}
    errors = {}
    for method in PRUNERS:
        engine.model.load_state_dict(dense)
        reports = prune_model(engine, calibration, [0.5] * engine.n_blocks, method)
        errors[method] = [
            sum(layer.relative_error for layer in r.layers) / len(r.layers) for r in reports
        ]
    for block in range(engine.n_blocks):
        others = min(errors["wanda"][block], errors["magnitude"][block])
        assert errors["sparsegpt"][block] < others, (block, errors)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reconstruction_error_is_measured_on_the_first_sequences(paths, family):
    """Block 0 sees the embeddings in the dense and the pruned model alike, so its layers' error
    can be recomputed from the inputs each layer gets in the pruned model:
    ||x W^T - x W'^T||^2 / ||x W^T||^2 over the first 8 sequences."""
    calibration = _calibration(12)
    engine, _ = load_model(paths[family], batch_size=5, with_tokenizer=False)
    dense = _weights(engine)[0]
    (report, *_) = prune_model(engine, calibration, [0.6] * engine.n_blocks, "wanda")
    inputs: dict[str, torch.Tensor] = {}
    layers = linear_layers(engine.blocks[0])

    def capture(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()

        return hook

    hooks = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    engine.model(calibration[:ERROR_SEQUENCES])
    for hook in hooks:
        hook.remove()
    for layer_report in report.layers:
        x = inputs[layer_report.name].reshape(-1, dense[layer_report.name].shape[1])
        ref = x @ dense[layer_report.name].T
        diff = ref - x @ layers[layer_report.name].weight.detach().T
        expected = float(diff.pow(2).sum() / ref.pow(2).sum())
        assert layer_report.relative_error == pytest.approx(expected, rel=1e-4)


def test_prune_and_score_is_the_pruned_models_own_loss(tiny_llama_path):
    import torch.nn.functional as F

    calibration = _calibration(6)
    engine, _ = load_model(tiny_llama_path, batch_size=4, with_tokenizer=False)
    nll = prune_and_score(engine, calibration, [0.5, 0.7, 0.3, 0.6], "sparsegpt")
    with torch.no_grad():
        logits = engine.model(calibration).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), calibration[:, 1:].flatten())
    assert nll == pytest.approx(float(expected), rel=1e-5)
