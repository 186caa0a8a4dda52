"""Checks that run before the first job, each failing in one line that names the key and the fix.

The schema (``svnup.config.validate``) checks what the config says on its own; this module checks
it against the world: the model (its block count, context length and family, read from its
config.json or a GGUF file's metadata without loading weights and without the network when it is
local, and its weight files), the datasets (their splits and first rows; a hub dataset cached here
or the hub answering), the device where jobs run on this machine, and the target paths asked for
on the command line. Each check reads headers and first rows only: Snakemake runs them whenever it
plans.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from svnup import config as cfg
from svnup import gguf_files
from svnup.config import ConfigError

_BLOCK_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
# Folders under results/<model>/ that hold keyed intermediates or user-facing outputs whose paths
# the rules define; anything else must be s<sparsity>/...
_KNOWN_FOLDERS = {
    "calibration",
    "probe",
    "coalitions",
    "shapley",
    "owl",
    "budget",
    "runs",
    "logs",
    "benchmarks",
    "report",
    "dense",
    "summary.csv",
}
_SPARSITY = re.compile(r"[0-9]+(\.[0-9]+)?")
# Files one of which a Hugging Face tokenizer is loaded from (fast, SentencePiece, BPE, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a model before it is loaded."""

    n_blocks: int
    context: int | None  # longest sequence its positions cover; None if its config does not say
    model_type: str | None = None  # config.model_type, which picks the family (svnup.families)


def _first(config: dict, keys: tuple[str, ...], where: str) -> int | None:
    """The first of ``keys`` that the config sets, a positive integer; multimodal models (Gemma 3)
    keep the language model's sizes in a nested text config."""
    for section in (config, config.get("text_config") or {}):
        found = next((k for k in keys if section.get(k) is not None), None)
        if found is None:
            continue
        value = section[found]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{where}: {found} is {value!r}, not a positive integer; restore the model folder"
            )
        return value
    return None


@functools.lru_cache(maxsize=64)
def _hub_facts(path: str, revision: str) -> ModelFacts:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision)
    text = config.get_text_config()
    return ModelFacts(
        int(text.num_hidden_layers),
        getattr(text, "max_position_embeddings", None),
        config.model_type,
    )


def model_facts(settings: dict, name: str = "") -> ModelFacts:
    """Block count and context length, from the model's config.json (a hub model's is fetched,
    a GGUF file's is its metadata)."""
    path, key = settings["path"], f"config key 'models.{name}.path'" if name else "model path"
    if gguf_files.is_gguf(path):
        return _gguf_facts(path, key)
    folder = Path(path).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{key}: {path} has no config.json; give a Hugging Face model folder")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as error:
            raise ConfigError(
                f"{key}: {config_file} is not valid JSON ({error}); restore the model folder"
            ) from None
        if not isinstance(config, dict):
            raise ConfigError(
                f"{key}: {config_file} holds a JSON {type(config).__name__}, not the object of a "
                "model's config; restore the model folder"
            )
        where = f"{key}: {config_file}"
        blocks = _first(config, _BLOCK_KEYS, where)
        if blocks is None:
            raise ConfigError(f"{where} names no block count ({_BLOCK_KEYS[0]})")
        if not config.get("model_type"):
            raise ConfigError(f"{where} names no model_type; restore the model folder")
        return ModelFacts(blocks, _first(config, _CONTEXT_KEYS, where), config["model_type"])
    if folder.exists() or cfg.is_workflow_path(path) or path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}: {path} is not a model folder; give a local folder or a hub id")
    try:
        return _hub_facts(path, settings["revision"])
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{key}: '{path}' (revision {settings['revision']}) is neither a local folder nor a "
            f"hub model that can be read ({error.__class__.__name__}); check the path, the "
            "revision, or the network (offline: HF_HUB_OFFLINE=1 with the model in the hub cache)"
        ) from None


def _gguf_facts(path: str, key: str) -> ModelFacts:
    """Facts of a GGUF entry, read without converting it (remembered, see svnup.gguf_files)."""
    try:
        file = gguf_files.locate(path)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{key}: reading a GGUF file needs the gguf package; pip install gguf")
    try:
        header = gguf_files.header(file)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"{key}: {file} is not a whole GGUF file ({reason}); restore it or download it again"
        ) from None
    return ModelFacts(header["block_count"], header["context_length"], header["model_type"])


def linear_layer_count(settings: dict) -> int:
    """Linear layers in the model's decoder blocks: the players of ``shapley.players: layers``.

    Counted on an empty copy of the model that its config builds on the meta device: no weights
    are read, but torch and transformers load, so only games on these players pay for it.
    """
    path = settings["path"]
    if gguf_files.is_gguf(path):
        file = gguf_files.locate(path)
        return _linear_count(str(file.parent), None, file.name)
    revision = None if Path(path).expanduser().is_dir() else settings["revision"]
    return _linear_count(path, revision)


@functools.lru_cache(maxsize=64)
def _linear_count(path: str, revision: str | None, gguf_file: str | None = None) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, gguf_file=gguf_file)
    return _count_linears(config)


def _count_linears(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from svnup.families import family_of
    from svnup.models import linear_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = model.get_submodule(family_of(config.model_type).blocks)
    return sum(len(linear_layers(block)) for block in blocks)


def check_estimator(settings: dict, n_blocks: int, name: str) -> None:
    """The configured Shapley estimator's parameters fit the game's players: the model's blocks,
    or its halves or linear layers (``shapley.players``)."""
    from svnup.players import players_per_block
    from svnup.shapley import MAX_EXACT_BLOCKS, make_estimator

    shapley = settings["shapley"]
    estimator, window, stride = shapley["estimator"], shapley["window"], shapley["stride"]
    where = f"of model '{name}'"
    kind = cfg.players(settings)
    layers = kind == "layers"
    n_players = cfg.n_players(settings) if layers else n_blocks * players_per_block(kind)
    if n_players == n_blocks:
        players = f"the model's {n_blocks} blocks"
    else:
        of = "linear layers" if layers else kind
        players = f"the game's {n_players} players (the {of} of {n_blocks} blocks)"
    if estimator == "swsv" and window > n_players:
        raise ConfigError(
            f"config key 'shapley.window' {where}: window {window} exceeds {players}; "
            f"use a window <= {n_players}"
        )
    if estimator == "swsv" and stride > window:
        raise ConfigError(
            f"config key 'shapley.stride' {where}: stride {stride} exceeds shapley.window "
            f"{window}, which would skip players; use a stride <= {window}"
        )
    if estimator == "swsv" and window > MAX_EXACT_BLOCKS:
        raise ConfigError(
            f"config key 'shapley.window' {where}: window {window} needs 2^{window} coalitions "
            f"per window; use a window <= {MAX_EXACT_BLOCKS}"
        )
    if estimator == "exact" and n_players > MAX_EXACT_BLOCKS:
        raise ConfigError(
            f"config key 'shapley.estimator' {where}: exact needs 2^{n_players} coalitions for "
            f"{players} (at most {MAX_EXACT_BLOCKS}); use swsv or permutation"
        )
    if estimator == "permutation" and shapley["n_permutations"] % 2:
        raise ConfigError(
            f"config key 'shapley.n_permutations' {where}: {shapley['n_permutations']} is odd, "
            "but orders are drawn in antithetic pairs; use an even number"
        )
    params = cfg.estimator_params(settings)
    try:
        make_estimator(n_blocks=n_players, name=params.pop("estimator"), **params)
    except ValueError as error:
        raise ConfigError(f"config key 'shapley' {where}: {error}") from None


def check_datasets(settings: dict, name: str) -> None:
    """Every calibration and evaluation source exists, has the split it is read with, and its
    first rows can be read; a hub dataset is cached here or the hub answers."""
    from svnup.data import HUB_NAMES, SPLIT_ALIASES, check_hub, check_source

    split = settings["evaluation"]["split"]
    if not any(split.lower() in aliases for aliases in SPLIT_ALIASES.values()):
        raise ConfigError(
            f"config key 'evaluation.split' of model '{name}': '{split}' is not a split name; "
            "use train, validation (valid, val) or test"
        )
    sources = [("calibration.dataset", settings["calibration"]["dataset"], "train")]
    sources += [("evaluation.datasets", d, split) for d in settings["evaluation"]["datasets"]]
    for key, source, wanted in sources:
        if cfg.is_workflow_path(source):
            continue  # a rule of this workflow builds it
        try:
            check_source(source, wanted)
            if source in HUB_NAMES:
                check_hub(source, wanted)
        except ValueError as error:
            raise ConfigError(f"config key '{key}' of model '{name}': {error}") from None


def check_device(settings: dict, name: str) -> None:
    """A model configured for CUDA can run on this machine (call it only when jobs run here: a
    cluster submits from a login node that may have no GPU)."""
    from svnup.gpus import cuda_problem

    device = settings["device"]
    problem = cuda_problem(device) if device.startswith("cuda") else None
    if problem:
        raise ConfigError(
            f"config key 'models.{name}.device': {device}, but {problem}; set device: cpu, or "
            "run where the GPU is (a GPU machine, or a cluster: --workflow-profile profiles/slurm)"
        )


def check_model(settings: dict, name: str) -> ModelFacts:
    """Everything about model ``name`` that can fail before its first job."""
    from svnup.content import RESTORE, check_model_dir
    from svnup.families import FAMILIES

    facts = model_facts(settings, name)
    if facts.model_type is not None and facts.model_type not in FAMILIES:
        raise ConfigError(
            f"config key 'models.{name}.path': {settings['path']} is a {facts.model_type!r} "
            f"model, a family svnup does not support; use a model of one of: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    path = Path(settings["path"]).expanduser()
    if not cfg.is_workflow_path(settings["path"]) and path.is_dir():
        try:
            check_model_dir(path, fix=RESTORE)
        except OSError as error:
            raise ConfigError(f"model '{name}': {error}") from None
    if facts.context is not None and settings["seqlen"] > facts.context:
        raise ConfigError(
            f"config key 'models.{name}.seqlen': {settings['seqlen']} exceeds the model's context "
            f"length (max_position_embeddings {facts.context}); use a seqlen <= {facts.context}"
        )
    check_estimator(settings, facts.n_blocks, name)
    check_datasets(settings, name)
    local = not cfg.is_workflow_path(settings["path"]) and path.is_dir()
    if local and not any((path / file).is_file() for file in _TOKENIZER_FILES):
        raise ConfigError(
            f"config key 'models.{name}.path': {settings['path']} has no tokenizer "
            f"({', '.join(_TOKENIZER_FILES[:3])}); copy the model's tokenizer files into it"
        )
    return facts


def target_model(config: dict, target: str) -> str | None:
    """The model a target path under results/ names, after checking the path's form; None for
    paths outside results/ and GGUF conversions."""
    parts = PurePosixPath(target).parts
    if len(parts) < 3 or parts[0] != "results" or f"{parts[0]}/{parts[1]}" == cfg.GGUF_FOLDER:
        return None
    model, first, rest = parts[1], parts[2], parts[3:]
    settings = cfg.model_settings(config, model)
    if first in _KNOWN_FOLDERS:
        return model
    form = (
        "results/<model>/s<sparsity>/[<allocation>/[<pruner>/]]ppl.json or "
        "results/<model>/s<sparsity>/<allocation>/<pruner>/recipe.yaml"
    )
    if not first.startswith("s"):
        raise ConfigError(
            f"target path {target}: '{first}' is not a result of the workflow; ask for "
            f"results/{model}/summary.csv, results/{model}/report/report.html or {form}"
        )
    if not _SPARSITY.fullmatch(first[1:]):
        raise ConfigError(
            f"target path {target}: '{first}' does not name a target sparsity; write s and a "
            "number in (0, 1), e.g. s0.7"
        )
    cfg.check_target(settings, float(first[1:]), key=f"target path {target}")
    from svnup.registry import ALLOCATIONS, PRUNERS

    allocations, pruners = list(ALLOCATIONS), list(PRUNERS)
    if (rest and rest[-1] == "ppl.json" and len(rest) <= 3) or (
        len(rest) == 3 and rest[-1] == "recipe.yaml"
    ):
        if len(rest) >= 2 and rest[0] not in allocations:
            raise ConfigError(
                f"target path {target}: unknown allocation '{rest[0]}'; choose one of "
                f"{', '.join(allocations)}"
            )
        if len(rest) >= 2:
            cfg.check_allocation(settings, rest[0], key=f"target path {target}")
        if len(rest) == 3 and rest[1] not in pruners:
            raise ConfigError(
                f"target path {target}: unknown pruner '{rest[1]}'; choose one of "
                f"{', '.join(pruners)}"
            )
        return model
    raise ConfigError(f"target path {target}: expected {form}")
