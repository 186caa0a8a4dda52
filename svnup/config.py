"""Workflow configuration: schema validation, per-model settings, and cache keys.

Every intermediate result lives under a path keyed by a hash of exactly the settings it depends on
(its *spec*), so a config change re-runs only the stages whose spec changed, and reverting a change
finds the earlier results again. A local model directory or dataset enters its spec with a
fingerprint of its content (``svnup.content``), a hub model with its revision, and a GGUF file
with the SHA-256 of its bytes (its conversion's folder, ``svnup.gguf_files``), so editing an input
in place is a change like any other. Local paths have one spelling (``local_path``), so writing
one another way changes no key. Runtime settings (device, batch size, offload) are not part of
any spec: moving a run from a workstation to a cluster recomputes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import yaml

GGUF_FOLDER = "results/gguf"  # float32 conversions of GGUF files, one folder per file content
# shapley.probe_pruner's value for "probe each run's games with the pruner of that run".
MATCH = "match"
LEVELLED = ("levels", "types")  # score sources that play games at each of a method's levels
MODEL_DEFAULTS = {
    "dtype": "float32",
    "seqlen": 2048,
    "device": "cpu",
    "batch_size": 8,
    "revision": "main",
}
OVERRIDABLE = ("calibration", "shapley", "allocation", "pruner", "evaluation")
# The grid of targets.* that a model entry's own `targets` may replace, key by key.
GRID = ("sparsities", "allocations", "pruners")
HUB_DATASETS = ("wikitext2", "c4", "ptb")


class ConfigError(ValueError):
    """A configuration problem, reported in one line that names the key."""


def _schema() -> dict:
    """The config schema, with every name that can be plugged in taken from the registries."""
    from svnup.data import PROTOCOLS
    from svnup.players import KINDS
    from svnup.registry import ALLOCATIONS, PRUNERS
    from svnup.shapley import ESTIMATORS

    text = resources.files("svnup").joinpath("schemas/config.schema.yaml").read_text()
    schema = yaml.safe_load(text)
    defs = schema["$defs"]
    defs["allocation_method"]["enum"] = list(ALLOCATIONS)
    defs["pruner"]["enum"] = list(PRUNERS)
    defs["protocol"]["enum"] = list(PROTOCOLS)
    defs["shapley"]["properties"]["estimator"]["enum"] = list(ESTIMATORS)
    defs["shapley"]["properties"]["probe_pruner"]["enum"] = [*PRUNERS, MATCH]
    defs["shapley"]["properties"]["players"]["enum"] = list(KINDS)
    sections = defs["allocation"]["properties"]
    for method, entry in ALLOCATIONS.items():
        if entry.params:
            sections[method] = {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: param.schema for name, param in entry.params.items()},
            }
    return schema


def error_key(error) -> str:
    """The dotted key a jsonschema error is about (the unknown or missing key itself)."""
    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        extra = re.findall(r"\('([^']+)'", error.message)  # "('a', 'b' were unexpected)"
        return ".".join(path + extra[:1]) or "<top level>"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return ".".join(path + missing[:1])
    return ".".join(path) or "<top level>"


def _admits_integer(schema: dict) -> bool:
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    return "integer" in types or any(_admits_integer(s) for s in schema.get("anyOf", []))


def schema_hint(error, spelled_in: str) -> str:
    """The fix for one schema error of a file whose keys are documented in ``spelled_in``."""
    if error.validator == "additionalProperties":
        return f"unknown key; remove it or check its spelling against {spelled_in}"
    if error.validator == "required":
        return "required key is missing; add it"
    return value_hint(error)


def value_hint(error) -> str:
    """What is wrong with the value a jsonschema error is about, with the fix where it is plain."""
    value = error.instance
    if isinstance(value, float) and value.is_integer() and _admits_integer(error.schema):
        return f"{value} is not an integer; write {int(value)}"
    if error.validator == "uniqueItems":
        return f"{repeated(value)!r} is listed twice; list each once"
    return error.message


def repeated(values: list):
    """The first value of ``values`` that an earlier one equals."""
    seen = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def _strict_integers(checker, instance) -> bool:
    """Integers as Python has them: JSON Schema's integer admits 4.0, which would get a cache key
    of its own and reach code that counts or slices with it."""
    return isinstance(instance, int) and not isinstance(instance, bool)


def schema_validator(schema: dict):
    """A JSON Schema (2020-12) validator of ``schema`` whose integers are Python's."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", _strict_integers)
    return jsonschema.validators.extend(base, type_checker=checker)(schema)


def check_config_file(path: str | Path) -> None:
    """Parse the workflow's config file before Snakemake does: a YAML error is named with its file
    and line (Snakemake's own message names neither), and so are an empty file and one whose top
    level is no mapping of keys. A missing file is left to Snakemake, which names it."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        reason = f"not UTF-8 text at byte {error.start}"
        raise ConfigError(f"{path}: {reason}; save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = "" if mark is None else f" line {mark.line + 1} column {mark.column + 1}"
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); fix it there") from None
    if data is None:
        raise ConfigError(
            f"{path} is empty; write the workflow's settings into it (the repository's "
            "config.yaml shows every key)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a YAML {type(data).__name__}, not the keys of a config (models:, "
            "calibration:, ...); write one key a line at its top level"
        )


def validate(config: dict) -> dict:
    """Check ``config`` against the schema and the cross-field rules; return it unchanged."""
    validator = schema_validator(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise ConfigError(f"config key '{error_key(error)}': {schema_hint(error, 'config.yaml')}")
    for name in config["targets"]["models"]:
        model_settings(config, name)
    if Path(GGUF_FOLDER).name in config["models"]:
        raise ConfigError(
            f"config key 'models.{Path(GGUF_FOLDER).name}': the name is taken by the folder of "
            f"converted GGUF files ({GGUF_FOLDER}); rename the model"
        )
    for name in config["models"]:
        settings = model_settings(config, name)
        bounds = settings["allocation"]
        if bounds["min"] > bounds["max"]:
            raise ConfigError(
                f"config key 'allocation.min': {bounds['min']} exceeds allocation.max "
                f"{bounds['max']}; make min <= max"
            )
        if players(settings) != "blocks" and settings["shapley"]["ablation"] != "prune":
            raise ConfigError(
                f"config key 'shapley.players' of model '{name}': {players(settings)} needs "
                "shapley.ablation: prune (skip removes whole blocks); set ablation: prune"
            )
        _check_split(settings, name)
        if settings["shapley"]["eval_samples"] > settings["calibration"]["nsamples"]:
            raise ConfigError(
                f"config key 'shapley.eval_samples' of model '{name}': "
                f"{settings['shapley']['eval_samples']} exceeds calibration.nsamples "
                f"{settings['calibration']['nsamples']}; lower it or sample more"
            )
        _check_protocols(settings, name)
        _check_nm(settings, name, config)
        own = "sparsities" in config["models"][name].get("targets", {})
        where = f"models.{name}.targets" if own else "targets"
        for target in settings["targets"]["sparsities"]:
            check_target(settings, target, key=f"{where}.sparsities")
        datasets = settings["evaluation"]["datasets"]
        if len(set(datasets)) < len(datasets):
            raise ConfigError(
                f"config key 'evaluation.datasets' of model '{name}': {repeated(datasets)} is "
                "listed twice (written two ways); list each dataset once"
            )
        _check_levels(settings, name)
        _check_methods(config, settings, name)
    return config


def _check_split(settings: dict, name: str) -> None:
    """``svnup-fit.split: types`` plays its type game on the probes, and splits players that hold
    several linear layers."""
    from svnup.registry import method_params

    if method_params(settings["allocation"], "svnup-fit")["split"] != "types":
        return
    key_name = f"config key 'allocation.svnup-fit.split' of model '{name}'"
    if settings["shapley"]["ablation"] != "prune":
        raise ConfigError(
            f"{key_name}: types prunes each layer type with the probes, which shapley.ablation "
            "skip has none of; set ablation: prune, or split: none"
        )
    if players(settings) == "layers":
        raise ConfigError(
            f"{key_name}: with shapley.players: layers every player is one linear layer, so "
            "there is nothing to split; use split: none, or players: halves"
        )


def _check_protocols(settings: dict, name: str) -> None:
    """An explicit protocol names a configured dataset and never contradicts a hub name."""
    evaluation, calibration = settings["evaluation"], settings["calibration"]
    given = [
        (f"evaluation.protocols.{dataset}", dataset, protocol)
        for dataset, protocol in evaluation.get("protocols", {}).items()
    ]
    for key_name, dataset, _ in given:
        if dataset not in evaluation["datasets"]:
            raise ConfigError(
                f"config key '{key_name}' of model '{name}': {dataset} is not one of "
                f"evaluation.datasets ({', '.join(evaluation['datasets'])}); write the dataset "
                "exactly as listed there, or remove the entry"
            )
    if "protocol" in calibration:
        given.append(("calibration.protocol", calibration["dataset"], calibration["protocol"]))
    for key_name, dataset, protocol in given:
        if dataset in HUB_DATASETS and protocol != dataset:
            raise ConfigError(
                f"config key '{key_name}' of model '{name}': the hub dataset {dataset} is read "
                f"with protocol {dataset}, not {protocol}; remove the entry"
            )


def nm_pattern(settings: dict) -> tuple[int, int] | None:
    """(N, M) of the model's N:M semi-structured pruning; None when it prunes unstructured."""
    if settings.get("nm") is None:
        return None  # planning never imports torch for unstructured runs
    from svnup.kernels import parse_nm

    return parse_nm(settings["nm"])


def _check_nm(settings: dict, name: str, config: dict) -> None:
    try:
        nm_pattern(settings)
    except ValueError as error:
        raise ConfigError(f"config key 'nm' of model '{name}': {error}") from None
    methods = {"allocation.method": [settings["allocation"]["method"]]}
    if name in config["targets"]["models"]:
        own = "allocations" in config["models"][name].get("targets", {})
        methods[f"models.{name}.targets.allocations" if own else "targets.allocations"] = settings[
            "targets"
        ]["allocations"]
    for key_name, chosen in methods.items():
        for method in chosen:
            check_allocation(settings, method, f"config key '{key_name}' of model '{name}'")


def check_allocation(settings: dict, method: str, key: str) -> None:
    """With nm every layer is pruned N of each M weights: only uniform allocation fits (which
    layers to prune N:M is an allocation question svnup does not answer yet)."""
    pattern = nm_pattern(settings)
    if pattern is not None and method != "uniform":
        raise ConfigError(
            f"{key}: {method} cannot be pruned with config key 'nm' {settings['nm']}, which "
            f"prunes every layer {pattern[0]} of each {pattern[1]} weights; use uniform "
            "allocation, or remove nm"
        )


def _check_methods(config: dict, settings: dict, name: str) -> None:
    """Parameters of the allocation methods a model's runs use that only fail for some models or
    targets (a method the config never runs is not held to them)."""
    from svnup.allocation import lsa_beta
    from svnup.registry import method_params

    used = {*settings["targets"]["allocations"], settings["allocation"]["method"]}
    if "svnup-types" in used and settings["shapley"]["ablation"] != "prune":
        raise ConfigError(
            f"config key 'shapley.ablation' of model '{name}': svnup-types prunes each layer "
            "type with the probes, which ablation skip has none of; set ablation: prune"
        )
    if "evopress" in used:
        _check_evopress(method_params(settings["allocation"], "evopress"), settings, name)
    lsa = method_params(settings["allocation"], "lsa")
    if "lsa" in used and lsa["beta"] is None:
        for target in settings["targets"]["sparsities"]:
            try:
                lsa_beta(target, lsa["granularity"])
            except ValueError as error:
                key = f"config key 'allocation.lsa.beta' of model '{name}'"
                raise ConfigError(f"{key}: {error}") from None


def _check_levels(settings: dict, name: str) -> None:
    from svnup.registry import ALLOCATIONS, method_params

    for method, entry in ALLOCATIONS.items():
        if entry.source is not None and entry.source.kind in LEVELLED:
            levels = method_params(settings["allocation"], method)["levels"]
            if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
                raise ConfigError(
                    f"config key 'allocation.{method}.levels' of model '{name}': {levels} must "
                    "increase strictly; list each probe sparsity once, in order"
                )


def _check_evopress(params: dict, settings: dict, name: str) -> None:
    where = f"of model '{name}'"
    steps, counts = params["survivors"], params["tokens"]
    if len(steps) != len(counts):
        raise ConfigError(
            f"config key 'allocation.evopress.tokens' {where}: {len(counts)} token counts for "
            f"{len(steps)} selection steps (survivors {steps}); give one per step"
        )
    available = settings["calibration"]["nsamples"] * settings["seqlen"]
    if max(counts) > available:
        raise ConfigError(
            f"config key 'allocation.evopress.tokens' {where}: {max(counts)} tokens exceed the "
            f"{settings['calibration']['nsamples']} x {settings['seqlen']} calibration tokens; "
            "lower them or raise calibration.nsamples"
        )


def check_target(settings: dict, target: float, key: str = "sparsity") -> None:
    """A target sparsity must lie in (0, 1), within the allocation bounds, and be N/M with nm."""
    lo, hi = settings["allocation"]["min"], settings["allocation"]["max"]
    if not 0.0 < target < 1.0:
        raise ConfigError(f"{key}: target sparsity {target} must be in (0, 1)")
    pattern = nm_pattern(settings)
    if pattern is not None and not math.isclose(target, pattern[0] / pattern[1], abs_tol=1e-9):
        n, m = pattern
        raise ConfigError(
            f"{key}: target sparsity {target} contradicts config key 'nm' {settings['nm']}, which "
            f"prunes {n} of each {m} weights ({n / m:g}); ask for {n / m:g} only, or remove nm"
        )
    if not lo <= target <= hi:
        raise ConfigError(
            f"{key}: target sparsity {target} cannot be a mean of per-block sparsities in "
            f"[allocation.min={lo}, allocation.max={hi}]; widen the bounds"
        )


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def model_settings(config: dict, name: str) -> dict:
    """The effective settings of model ``name``: global sections with its overrides applied."""
    if name not in config["models"]:
        known = ", ".join(sorted(config["models"]))
        raise ConfigError(f"model '{name}' is not in config key 'models'; known models: {known}")
    entry = {**MODEL_DEFAULTS, "offload": "auto", **config["models"][name]}
    settings = {key: entry[key] for key in entry if key not in (*OVERRIDABLE, "targets")}
    for section in OVERRIDABLE:
        base = config[section]
        if section in entry:
            base = _merge(base, entry[section]) if isinstance(base, dict) else entry[section]
        settings[section] = copy.deepcopy(base)
    settings.setdefault("nm", config.get("nm"))
    grid = {**config.get("targets", {}), **entry.get("targets", {})}
    settings["targets"] = {k: list(grid[k]) for k in GRID if k in grid}
    settings["save_model"] = bool(config.get("save_model", False))
    _spell_paths_once(settings)
    return settings


def _spell_paths_once(settings: dict) -> None:
    """The model, dataset and task folder paths of ``settings`` in their one spelling."""
    settings["path"] = local_path(settings["path"])
    calibration, evaluation = settings["calibration"], settings["evaluation"]
    if "dataset" in calibration:
        calibration["dataset"] = dataset_path(calibration["dataset"])
    if "datasets" in evaluation:
        evaluation["datasets"] = [dataset_path(d) for d in evaluation["datasets"]]
    zero_shot = evaluation.get("zero_shot") or {}
    if zero_shot.get("include_path"):
        zero_shot["include_path"] = local_path(zero_shot["include_path"])


def local_path(path: str) -> str:
    """One spelling of a local file or folder, so that its cache keys do not depend on how it is
    written: relative to the working directory when it lies inside it, else absolute; ``~``
    expanded; no ``.``, ``..`` or trailing ``/``. Symlinks are kept as written, not resolved (a
    link's target may be mounted elsewhere on a cluster node; the content fingerprint follows the
    target anyway). A path that names nothing here (a hub id, or a missing file, which is reported
    before planning) is kept as written; so is one already in this form, and with it its keys."""
    absolute = os.path.abspath(os.path.expanduser(path))
    inside = _inside_cwd(absolute)
    spelled = absolute if inside is None else inside
    if not (os.path.exists(absolute) or is_workflow_path(spelled)):
        return path
    return spelled


def _inside_cwd(absolute: str) -> str | None:
    """``absolute`` relative to the working directory if it lies inside it, also when written
    through a link to it or to one of its parents (``os.getcwd`` has links resolved)."""
    cwd = os.getcwd()
    if absolute == cwd or absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, cwd)
    here = os.stat(cwd)
    for parent in Path(absolute).parents:
        try:
            found = os.stat(parent)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (here.st_dev, here.st_ino):
            return os.path.relpath(absolute, parent)
    return None


def dataset_path(dataset: str) -> str:
    """A dataset in its one spelling: hub names as they are, a local path by ``local_path``, with
    ``./`` kept before a local path that would read as a hub name (``./c4``)."""
    if dataset in HUB_DATASETS:
        return dataset
    spelled = local_path(dataset)
    return f"./{spelled}" if spelled in HUB_DATASETS else spelled


def key(spec: dict) -> str:
    """A short stable hash of a spec (canonical JSON)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def runtime(settings: dict) -> dict:
    """Settings that change how a stage runs but never what it computes."""
    return {k: settings[k] for k in ("device", "batch_size", "offload")}


def model_spec(settings: dict) -> dict:
    return {"path": model_dir(settings), "dtype": settings["dtype"], **model_source(settings)}


def model_dir(settings: dict) -> str:
    """The folder (or hub id) the stages load the model from: for a GGUF entry, the folder its
    conversion writes, keyed by the file's content (``svnup.gguf_files``)."""
    from svnup import gguf_files

    path = settings["path"]
    if not gguf_files.is_gguf(path):
        return path
    return f"{GGUF_FOLDER}/{key({'gguf': gguf_files.digest(gguf_files.locate(path))})}"


def model_source(settings: dict) -> dict:
    """What identifies the model's weights beyond its path: a local directory's content
    fingerprint, or a hub id's revision (a GGUF's conversion folder is keyed by its content
    already)."""
    path = model_dir(settings)
    if is_workflow_path(path):
        return {}
    if Path(path).expanduser().exists():
        return {"content": _fingerprint(path)}
    return {"revision": settings["revision"]}


def data_content(dataset: str) -> str | None:
    """A local dataset's content fingerprint; None for hub names and workflow-built files (and
    for a missing file, which is reported before planning, see ``svnup.preflight``)."""
    if dataset in HUB_DATASETS or is_workflow_path(dataset):
        return None
    if not Path(dataset).expanduser().exists():
        return None
    return _fingerprint(dataset)


def _fingerprint(path: str) -> str:
    from svnup.content import fingerprint

    return fingerprint(path)


def calibration_spec(settings: dict) -> dict:
    calibration = settings["calibration"]
    spec = {"model": model_spec(settings), "seqlen": settings["seqlen"], **calibration}
    content = data_content(calibration["dataset"])
    if content:
        spec["dataset_content"] = content
    return spec


def probe_spec(settings: dict) -> dict:
    shapley = settings["shapley"]
    if shapley["probe_pruner"] == MATCH:
        raise ValueError("probe_pruner 'match' names no pruner; resolve it with for_pruner()")
    return {
        "calibration": key(calibration_spec(settings)),
        "sparsity": shapley["probe_sparsity"],
        "pruner": shapley["probe_pruner"],
    }


def for_pruner(settings: dict, pruner: str | None) -> dict:
    """The settings of a run pruned with ``pruner``: ``probe_pruner: match`` probes its games
    with that pruner, so each pruner of a config gets the game that predicts its own damage."""
    if settings["shapley"]["probe_pruner"] != MATCH:
        return settings
    if pruner is None:
        raise ValueError("probe_pruner 'match' needs the run's pruner")
    return {**settings, "shapley": {**settings["shapley"], "probe_pruner": pruner}}


def games(settings: dict) -> list[dict]:
    """The settings of every game the config can play: each probe level, with each probe
    pruner (every pruner when ``probe_pruner`` is ``match``)."""
    from svnup.registry import PRUNERS

    return [
        for_pruner(at_probe(settings, level), pruner)
        for level in probe_levels(settings)
        for pruner in (PRUNERS if settings["shapley"]["probe_pruner"] == MATCH else [None])
    ]


def players(settings: dict) -> str:
    """The players of the coalition game (``svnup.players``): blocks unless the config says."""
    return settings["shapley"].get("players", "blocks")


def n_players(settings: dict) -> int:
    """Players of the coalition game, from the model's config (no weights are loaded)."""
    from svnup.players import players_per_block

    if players(settings) == "layers":
        from svnup.preflight import linear_layer_count

        return linear_layer_count(settings)
    return n_blocks(settings) * players_per_block(players(settings))


def store_spec(settings: dict) -> dict:
    """Identity of a coalition store: what a coalition's raw NLL depends on (not the estimator).

    ``targets`` and ``players`` enter only when they are not the defaults (the text's tokens,
    whole blocks), so stores from before these options keep their keys."""
    shapley = settings["shapley"]
    spec = {
        "calibration": key(calibration_spec(settings)),
        "ablation": shapley["ablation"],
        "eval_samples": shapley["eval_samples"],
    }
    if shapley["targets"] != "text":
        spec["targets"] = shapley["targets"]
    if players(settings) != "blocks":
        spec["players"] = players(settings)
    if shapley["ablation"] == "prune":
        spec["probe"] = key(probe_spec(settings))
    return spec


def type_game_spec(settings: dict) -> dict:
    """The store of the type game at the settings' probe (``svnup.stages.type_game``): a game of
    ``layers`` players on the same probe, whose coalitions it shares."""
    return store_spec({**settings, "shapley": {**settings["shapley"], "players": "layers"}})


def estimator_params(settings: dict, estimator: str | None = None) -> dict:
    """The estimator and only the parameters it uses."""
    shapley = settings["shapley"]
    name = estimator or shapley["estimator"]
    params = {"estimator": name}
    if name == "swsv":
        params.update(width=shapley["window"], stride=shapley["stride"])
    elif name == "permutation":
        params.update(n_permutations=shapley["n_permutations"], seed=0)
    return params


def shapley_spec(settings: dict, estimator: str | None = None) -> dict:
    return {
        "store": key(store_spec(settings)),
        **estimator_params(settings, estimator),
        "value": settings["shapley"]["value"],
    }


def metric_spec(settings: dict, metric: str, params: dict) -> dict:
    """A dense-model metric: the model, and the calibration data where the metric reads it."""
    from svnup.registry import METRICS

    if METRICS[metric].statistics:
        base = {"calibration": key(calibration_spec(settings))}
    else:
        base = {"model": model_spec(settings)}
    return {**base, "metric": metric, **params}


def search_spec(settings: dict, method: str, params: dict, pruner: str) -> dict:
    """A search over allocations (the target is in the path): its candidates are allocations
    within the bounds, pruned with ``pruner`` and scored on the calibration data."""
    return {
        "calibration": key(calibration_spec(settings)),
        "search": method,
        "pruner": pruner,
        "min": settings["allocation"]["min"],
        "max": settings["allocation"]["max"],
        **params,
    }


def at_probe(settings: dict, sparsity: float) -> dict:
    """The settings with another Shapley probe sparsity."""
    return {**settings, "shapley": {**settings["shapley"], "probe_sparsity": sparsity}}


def probe_levels(settings: dict) -> list[float]:
    """Every probe sparsity a game is played at: the Shapley probe and the levels of every
    allocation method that measures damage at several sparsities."""
    from svnup.registry import ALLOCATIONS, method_params

    levels = {settings["shapley"]["probe_sparsity"]}
    for method, entry in ALLOCATIONS.items():
        if entry.source is not None and entry.source.kind in LEVELLED:
            levels.update(method_params(settings["allocation"], method)["levels"])
    return sorted(levels)


def score_spec(settings: dict, method: str, pruner: str) -> dict | None:
    """What allocation ``method``'s per-block scores depend on; None if it reads none."""
    from svnup.registry import ALLOCATIONS, keyed_params, method_params

    source = ALLOCATIONS[method].source
    if source is None:
        return None
    if source.kind in ("shapley", *LEVELLED):
        settings = for_pruner(settings, pruner)
    if source.kind == "shapley":
        return shapley_spec(settings, source.name)
    values = method_params(settings["allocation"], method)
    if source.kind in LEVELLED:
        levels = values["levels"]
        spec = {"levels": levels}
        if source.kind == "levels":
            games = [shapley_spec(at_probe(settings, p), source.name) for p in levels]
            spec["shapley"] = [key(game) for game in games]
        if source.kind == "types" or values.get("split", "none") == "types":
            spec["type_games"] = [key(type_game_spec(at_probe(settings, p))) for p in levels]
        if source.kind == "types":  # no mapping reads them: the curve's spec carries them
            spec |= {"floor": values["floor"], "unit": values["unit"]}
        return spec
    params = keyed_params(method, values, source.params)
    if source.kind == "metric":
        return metric_spec(settings, source.name, params)
    spec = search_spec(settings, method, params, search_pruner(values, pruner))
    start = search_start(settings, method, pruner)
    if start is not None:
        spec["start_budget"] = key(budget_spec(settings, *start))
    return spec


def search_start(settings: dict, method: str, pruner: str | None) -> tuple[str, str] | None:
    """The (allocation, pruner) of the budget a search starts from: the method's ``start``
    allocation for the target, pruned with the search's pruner; None for a search from uniform."""
    from svnup.registry import ALLOCATIONS, method_params

    source = ALLOCATIONS[method].source
    values = method_params(settings["allocation"], method)
    if source is None or source.kind != "search" or values.get("start", "uniform") == "uniform":
        return None
    return values["start"], search_pruner(values, pruner)


def search_pruner(values: dict, pruner: str | None) -> str | None:
    """The pruner a search prunes its candidates with: its ``probe_pruner`` where it has one,
    else (and for ``match``) the run's."""
    chosen = values.get("probe_pruner", MATCH)
    return pruner if chosen == MATCH else chosen


def database_spec(settings: dict, method: str, pruner: str) -> dict | None:
    """What a search's level database depends on (the target is in the path); None for a method
    that reads none."""
    from svnup.registry import ALLOCATIONS, method_params

    source = ALLOCATIONS[method].source
    if source is None or not source.database:
        return None
    values = method_params(settings["allocation"], method)
    return {
        "calibration": key(calibration_spec(settings)),
        "pruner": search_pruner(values, pruner),
        **{name: values[name] for name in source.database},
    }


def budget_spec(settings: dict, method: str, pruner: str) -> dict:
    """What an allocation depends on, for every target sparsity (the target is in the path).

    Only a method whose scores come from a search with the run's pruner depends on the pruner.
    """
    from svnup.registry import ALLOCATIONS, method_params

    allocation = settings["allocation"]
    values = method_params(allocation, method)
    spec = {
        "method": method,
        "min": allocation["min"],
        "max": allocation["max"],
        "calibration": key(calibration_spec(settings)),
        **{name: values[name] for name in ALLOCATIONS[method].mapping_params},
    }
    scores = score_spec(settings, method, pruner)
    if scores is not None:
        spec["scores"] = key(scores)
    return spec


def prune_spec(settings: dict, method: str, sparsity: float, pruner: str) -> dict:
    """What a pruned checkpoint depends on; ``nm`` enters only when set, so unstructured runs
    keep their keys."""
    spec = {
        "budget": key(budget_spec(settings, method, pruner)),
        "sparsity": sparsity,
        "pruner": pruner,
        "calibration": key(calibration_spec(settings)),
    }
    pattern = nm_pattern(settings)
    if pattern is not None:
        spec["nm"] = f"{pattern[0]}:{pattern[1]}"
    return spec


def eval_spec(settings: dict, dataset: str) -> dict:
    """What a perplexity depends on; an explicit protocol (``evaluation.protocols``) enters only
    when set, so evaluations read with the name-based default keep their keys."""
    spec = {
        "dataset": dataset,
        "split": settings["evaluation"]["split"],
        "seqlen": settings["seqlen"],
    }
    protocol = settings["evaluation"].get("protocols", {}).get(dataset)
    if protocol is not None:
        spec["protocol"] = protocol
    content = data_content(dataset)
    if content:
        spec["content"] = content
    if settings["evaluation"].get("windows") is not None:
        spec["windows"] = settings["evaluation"]["windows"]
    return spec


def eval_id(settings: dict, dataset: str) -> str:
    """A readable file stem for one evaluation: the dataset's name and its spec's key."""
    stem = Path(dataset).stem if dataset not in HUB_DATASETS else dataset
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-") or "data"
    return f"{slug}-{key(eval_spec(settings, dataset))}"


def is_workflow_path(path: str) -> bool:
    """Whether ``path`` names a file the workflow itself produces (a rule must build it first)."""
    return Path(path).parts[:1] == ("results",)


def n_blocks(settings: dict) -> int:
    """Decoder blocks of the model, read from its config before any weights are loaded."""
    from svnup.preflight import model_facts

    return model_facts(settings).n_blocks
