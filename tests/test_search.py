"""The search stage: ATP's progression of per-block sparsities, on its own or added to a seed
method's budget (SV-NUP-fit-tilt), scored by the calibration loss after pruning.

Why: a search is only as good as its candidates. Each candidate must be exactly the allocation
the budget stage later makes of the written scores, beta = 0 of a seeded search must be the seed
itself (so a scan of the grid never picks worse than the seed on calibration data), and a seed
from another target or configuration must be refused rather than silently searched around.
"""

from __future__ import annotations

import numpy as np
import pytest
from workflow_fixture import calibrated_project

from svnup import config as cfg
from svnup import stages
from svnup.calibration import load_statistics
from svnup.io import read_json, write_json
from svnup.models import load_model
from svnup.pruning import prune_and_score

N_LAYERS = 4
TARGET = 0.5
RUNTIME = {"device": "cpu", "batch_size": 4, "offload": "auto"}
SEED_SPARSITIES = [0.35, 0.6, 0.55, 0.5]  # equal block sizes: weighted mean 0.5
SEED_SPEC = {"method": "svnup-fit", "min": 0.0, "max": 0.99, "scores": "k"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("search")
    calibration_spec, calibration = calibrated_project(root, N_LAYERS, RUNTIME)
    seed = root / "seed.json"
    write_json(
        seed,
        {
            "spec": SEED_SPEC,
            "target": TARGET,
            "sparsities": SEED_SPARSITIES,
            "scores": {"source": "curve", "n_coalitions": 12, "seconds": 3.0},
        },
    )
    return {
        "root": root,
        "model": calibration_spec["model"],
        "calibration": calibration,
        "seed": seed,
    }


def _spec(**extra) -> dict:
    spec = {
        "calibration": "c",
        "search": "svnup-fit-tilt",
        "pruner": "wanda",
        "min": 0.0,
        "max": 0.99,
        "step": 0.05,
        "strategy": "grid",
        "seed": cfg.key(SEED_SPEC),
    }
    return {**spec, **extra}


def _loss(setup: dict, sparsities: list[float]) -> float:
    """The calibration NLL of the model pruned with ``sparsities``, on a freshly loaded model."""
    ids, _, _ = load_statistics(setup["calibration"])
    engine, _ = load_model(setup["model"]["path"], batch_size=4, with_tokenizer=False)
    return prune_and_score(engine, ids, sparsities, "wanda")


def test_seeded_search_starts_at_the_seed_and_adds_atps_progression(setup):
    out = setup["root"] / "search.json"
    stages.search(
        _spec(), RUNTIME, setup["model"], TARGET, setup["calibration"], out, setup["seed"]
    )
    result = read_json(out)
    betas = [c["beta"] for c in result["candidates"]]
    # ATP's grid at 4 blocks, 50%: beta <= min(2 * 0.5, 2 * 0.5) / 3, plus the seed itself
    assert betas == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    depth = np.arange(N_LAYERS) - (N_LAYERS - 1) / 2
    for candidate in (result["candidates"][0], result["candidates"][2]):
        # equal block sizes and no clipping: the progression keeps the mean, no shift needed
        expected = np.asarray(SEED_SPARSITIES) + candidate["beta"] * depth
        assert candidate["nll"] == pytest.approx(_loss(setup, expected.tolist()), rel=1e-6)
    best = min(result["candidates"], key=lambda c: c["nll"])
    assert result["beta"] == best["beta"]
    assert result["n_coalitions"] == 12
    assert result["seconds"] == pytest.approx(result["search_seconds"] + 3.0)
    assert not out.with_suffix(".journal").exists()

    budget = setup["root"] / "budget.json"
    budget_spec = {"method": "svnup-fit-tilt", "min": 0.0, "max": 0.99, "scores": "k"}
    stages.budget(budget_spec, TARGET, setup["calibration"], out, budget)
    chosen = np.asarray(read_json(budget)["sparsities"])
    assert chosen.mean() == pytest.approx(TARGET, abs=1e-12)
    # within the bounds, the budget is the progression shifted by one constant to the mean
    inside = (chosen > 0.0) & (chosen < 0.99)
    shift = chosen - (np.asarray(SEED_SPARSITIES) + best["beta"] * depth)
    np.testing.assert_allclose(shift[inside], shift[inside][0], atol=1e-12)
    assert _loss(setup, chosen.tolist()) == pytest.approx(best["nll"], rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "target", "message"),
    [
        (_spec(seed="other"), TARGET, "is not the seed this search names"),
        (_spec(), 0.6, "is not the seed this search names"),
    ],
)
def test_search_refuses_a_seed_it_does_not_name(setup, spec, target, message):
    out = setup["root"] / "refused.json"
    with pytest.raises(ValueError, match=message):
        stages.search(
            spec, RUNTIME, setup["model"], target, setup["calibration"], out, setup["seed"]
        )
    assert not out.exists()


def test_seeded_search_needs_its_seed_and_atp_takes_none(setup):
    out = setup["root"] / "refused.json"
    with pytest.raises(ValueError, match="needs --seed"):
        stages.search(_spec(), RUNTIME, setup["model"], TARGET, setup["calibration"], out)
    atp = {k: v for k, v in _spec(search="atp").items() if k != "seed"}
    with pytest.raises(ValueError, match="takes no --seed"):
        stages.search(
            atp, RUNTIME, setup["model"], TARGET, setup["calibration"], out, setup["seed"]
        )
