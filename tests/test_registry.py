"""The registries are the one place a pruner, metric or allocation method is declared: the
schema, the config defaults and the stages read them (the workflow test runs every method)."""

from __future__ import annotations

import copy

import pytest
import yaml
from workflow_fixture import REPO

from svnup import config as cfg
from svnup.registry import ALLOCATIONS, METRICS, PRUNERS, method_params, resolve
from svnup.shapley import ESTIMATORS


def test_schema_enums_come_from_the_registries():
    schema = cfg._schema()
    defs = schema["$defs"]
    assert defs["allocation_method"]["enum"] == list(ALLOCATIONS)
    assert defs["pruner"]["enum"] == list(PRUNERS)
    assert defs["shapley"]["properties"]["estimator"]["enum"] == list(ESTIMATORS)
    assert defs["shapley"]["properties"]["probe_pruner"]["enum"] == [*PRUNERS, cfg.MATCH]
    sections = defs["allocation"]["properties"]
    for method, entry in ALLOCATIONS.items():
        if entry.params:
            assert set(sections[method]["properties"]) == set(entry.params), method


def test_every_pruner_can_probe_a_game():
    """``shapley.probe_pruner`` accepts every registered pruner, so each needs a probe."""
    from svnup.calibration import PROBE_PRUNERS

    assert set(PROBE_PRUNERS) == set(PRUNERS)


def test_every_implementation_resolves():
    for entry in PRUNERS.values():
        assert callable(resolve(entry.kernel))
    for entry in METRICS.values():
        assert callable(resolve(entry.function))
    for method, entry in ALLOCATIONS.items():
        assert callable(resolve(entry.mapping)), method
        if entry.source is not None and entry.source.kind == "metric":
            assert entry.source.name in METRICS, method
        if entry.source is not None and entry.source.kind == "shapley":
            assert entry.source.name in (None, *ESTIMATORS), method


def test_config_defaults_and_overrides():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for method, entry in ALLOCATIONS.items():
        assert method_params({}, method) == {n: p.default for n, p in entry.params.items()}
        if entry.params:  # the shipped config.yaml shows every method's defaults
            assert config["allocation"][method] == method_params({}, method), method
    assert method_params({"owl": {"m": 7.0}}, "owl") == {"m": 7.0, "lambda": 0.08}


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("allocation", "method"), "random", "config key 'allocation.method'"),
        (("pruner",), "obs", "config key 'pruner'"),
        (("shapley", "probe_pruner"), "obs", "config key 'shapley.probe_pruner'"),
        (("allocation", "dlp"), {"alpha": -1}, "config key 'allocation.dlp.alpha'"),
        (("allocation", "atp"), {"beta": 0.1}, "config key 'allocation.atp.beta': unknown key"),
        (("targets", "allocations"), ["owl", "random"], "config key 'targets.allocations.1'"),
    ],
)
def test_names_outside_the_registries_are_config_errors(path, value, message):
    config = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    node = config
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(cfg.ConfigError, match=message.replace(".", r"\.")):
        cfg.validate(config)


def _config(**allocation) -> dict:
    config = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    config["allocation"].update(allocation)
    return config


def test_lsa_beta_is_checked_for_the_targets_it_runs_at():
    config = _config()
    config["targets"].update(sparsities=[0.5, 0.9], allocations=["uniform"])
    cfg.validate(config)  # lsa is not run
    config["targets"]["allocations"] = ["uniform", "lsa"]
    with pytest.raises(cfg.ConfigError, match="'allocation.lsa.beta' of model 'demo': .*0.9"):
        cfg.validate(config)
    config["allocation"]["lsa"] = {"granularity": "projection"}  # one beta at every target
    cfg.validate(config)
    config["allocation"]["lsa"] = {"beta": 0.1}
    cfg.validate(config)


def test_evopress_selection_steps_are_checked_against_the_calibration():
    config = _config()
    config["targets"]["allocations"] = ["evopress"]
    with pytest.raises(cfg.ConfigError, match="65536 tokens exceed the 32 x 128 calibration"):
        cfg.validate(config)
    config["allocation"]["evopress"] = {"tokens": [256, 4096], "survivors": [8, 2, 1]}
    with pytest.raises(cfg.ConfigError, match="2 token counts for 3 selection steps"):
        cfg.validate(config)
    config["allocation"]["evopress"]["survivors"] = [8, 1]
    cfg.validate(config)
    config["targets"]["allocations"] = ["uniform"]  # a method the config never runs
    config["allocation"]["evopress"] = {"tokens": [10**6]}
    cfg.validate(config)


def test_evopress_options_beyond_the_reference_enter_the_search_key_only_when_set():
    """The default search keeps the key it had before start, patience and tolerance existed; a
    seeded search depends on the budget it starts from, for the search's pruner."""
    s = cfg.model_settings(cfg.validate(_config()), "demo")
    before = ("probe_pruner", "num_levels", "weights_diff", "generations", "offspring")
    before += ("survivors", "tokens", "fitness", "seed")
    default = {
        "calibration": cfg.key(cfg.calibration_spec(s)),
        "search": "evopress",
        "pruner": "sparsegpt",
        "min": s["allocation"]["min"],
        "max": s["allocation"]["max"],
        **{name: ALLOCATIONS["evopress"].params[name].default for name in before},
    }
    for pruner in PRUNERS:
        assert cfg.score_spec(s, "evopress", pruner) == default
        assert cfg.search_start(s, "evopress", pruner) is None

    def spec(pruner, **evopress):
        settings = cfg.model_settings(cfg.validate(_config(evopress=evopress)), "demo")
        return settings, cfg.score_spec(settings, "evopress", pruner)

    _, tolerant = spec("wanda", tolerance=0.0, patience=None, start="uniform")
    assert tolerant == default
    _, patient = spec("wanda", patience=5, tolerance=0.01)
    assert patient == {**default, "patience": 5, "tolerance": 0.01}
    seeded_s, seeded = spec("wanda", start="svnup-fit")
    assert cfg.search_start(seeded_s, "evopress", "wanda") == ("svnup-fit", "sparsegpt")
    start = cfg.key(cfg.budget_spec(seeded_s, "svnup-fit", "sparsegpt"))
    assert seeded == {**default, "start": "svnup-fit", "start_budget": start}
    matched_s, matched = spec("wanda", start="svnup-fit", probe_pruner="match")
    assert cfg.search_start(matched_s, "evopress", "wanda") == ("svnup-fit", "wanda")
    assert matched["pruner"] == "wanda"
    config = _config(evopress={"start": "svnup-fit"})
    config["allocation"]["svnup-fit"] = {"levels": [0.5, 0.7]}  # another start budget
    other = cfg.score_spec(cfg.model_settings(cfg.validate(config), "demo"), "evopress", "wanda")
    assert other["start_budget"] != start
