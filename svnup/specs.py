"""What each stage's JSON options may hold (svnup/schemas/specs.schema.yaml), checked before the
stage does any work.

The workflow's rules pass the specs that ``svnup.config`` builds, but a stage run by hand gets
whatever was typed: ``windows: -3`` would evaluate every window and a missing key would surface as
a KeyError deep inside the stage. Checks that need the model's config (``seqlen`` against its
context length) come later, in the stage, once it has read the model's config.json
(``check_context``).
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from svnup.config import error_key, schema_hint, schema_validator


class SpecError(ValueError):
    """A stage option that does not fit its schema, in one line that names the option and key."""


@functools.cache
def _schemas() -> dict:
    """The stage schemas, with the names and parameters of the registries filled in."""
    from svnup.data import PROTOCOLS
    from svnup.players import KINDS
    from svnup.registry import ALLOCATIONS, METRICS, PRUNERS
    from svnup.shapley import ESTIMATORS

    text = resources.files("svnup").joinpath("schemas/specs.schema.yaml").read_text()
    schema = yaml.safe_load(text)
    defs, stages = schema["$defs"], schema["stages"]
    defs["pruner"]["enum"] = list(PRUNERS)
    defs["protocol"]["enum"] = list(PROTOCOLS)
    defs["estimator_name"]["enum"] = list(ESTIMATORS)
    stages["coalitions"]["spec"]["properties"]["players"]["enum"] = list(KINDS)
    for spec in (stages["coalitions"]["estimator"], stages["shapley"]["spec"]):
        spec["properties"].update(copy.deepcopy(defs["estimator_params"]))

    def params(kind: str) -> dict[str, Any]:
        return {
            name: copy.deepcopy(entry.params[name].schema)
            for entry in ALLOCATIONS.values()
            if entry.source is not None and entry.source.kind == kind
            for name in entry.source.params
        }

    metric = stages["metric"]["spec"]
    metric["properties"]["metric"]["enum"] = list(METRICS)
    metric["properties"].update(params("metric"))
    search = stages["search"]["spec"]
    searches = {m: e for m, e in ALLOCATIONS.items() if e.source and e.source.kind == "search"}
    search["properties"]["search"]["enum"] = list(searches)
    search["properties"].update(params("search"))
    search["allOf"] = [
        {
            "if": {"properties": {"search": {"const": method}}},
            "then": {"required": [n for n in entry.source.params if not entry.params[n].optional]},
        }
        for method, entry in searches.items()
    ]
    levels = stages["levels"]["spec"]
    for entry in searches.values():
        levels["properties"].update(
            {name: copy.deepcopy(entry.params[name].schema) for name in entry.source.database}
        )
        levels["required"] += [n for n in entry.source.database if n not in levels["required"]]
    budget = stages["budget"]["spec"]
    budget["properties"]["method"]["enum"] = list(ALLOCATIONS)
    budget["allOf"] = []
    for method, entry in ALLOCATIONS.items():
        mapping = {name: entry.params[name].schema for name in entry.mapping_params}
        budget["properties"].update(copy.deepcopy(mapping))
        if mapping:
            budget["allOf"].append(
                {
                    "if": {"properties": {"method": {"const": method}}},
                    "then": {"required": list(mapping)},
                }
            )
    return schema


def check(stage: str, option: str, value: Any) -> None:
    """Raise a one-line SpecError unless ``value`` of ``--option`` fits the stage's schema."""
    schemas = _schemas()
    schema = schemas["stages"].get(stage, {}).get(option)
    if schema is None:
        return
    validator = schema_validator({"$defs": schemas["$defs"], **schema})
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        flag = "--" + option.replace("_", "-")
        other = _stage_whose(option, value, schemas)
        if other is not None:
            raise SpecError(
                f"{flag}: this is the {option} of the {other} stage, not of {stage}; "
                f"pass the {option} that the {stage} stage takes (see the rule that runs it)"
            )
        where = error_key(error)
        if where == "<top level>":
            raise SpecError(f"{flag}: {error.message}")
        hint = schema_hint(error, f"the {stage} stage's keys in svnup/schemas/specs.schema.yaml")
        raise SpecError(f"{flag}: key '{where}': {hint}")


def _stage_whose(option: str, value: Any, schemas: dict) -> str | None:
    """The stage whose ``option`` schema ``value`` fits, if one does (an object, so that ``{}``
    or a list names no stage)."""
    if not isinstance(value, dict) or not value:
        return None
    for stage, options in schemas["stages"].items():
        schema = options.get(option)
        if schema is not None:
            validator = schema_validator({"$defs": schemas["$defs"], **schema})
            if validator.is_valid(value):
                return stage
    return None


def check_context(model: dict, seqlen: int, path: str | None = None) -> None:
    """``seqlen`` must fit the positions of the model at ``path`` (the spec's model by default),
    read from its config.json before any weights load. A path that is not there is left to the
    loader, which names it."""
    from svnup.preflight import model_facts

    path = path or model["path"]
    folder = Path(path).expanduser()
    if not folder.is_dir() and (folder.exists() or path.startswith((".", "/", "~"))):
        return
    own = path == model["path"]
    settings = {
        "path": path,
        "revision": (model.get("revision") if own else None) or "main",
    }
    context = model_facts(settings).context
    if context is not None and seqlen > context:
        raise SpecError(
            f"--spec: key 'seqlen': {seqlen} exceeds the context of model {path} "
            f"(max_position_embeddings {context}); use a seqlen <= {context}"
        )
