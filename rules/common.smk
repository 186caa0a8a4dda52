import functools
import json
import shlex
import sys
from pathlib import Path

from snakemake.logging import logger as snakemake_logger

from svnup import config as cfg
from svnup import gguf_files, preflight
from svnup.joblog import report_failed_jobs
from svnup.provenance import measured_elsewhere
from svnup.registry import ALLOCATIONS, METRICS, PRUNERS
from svnup.shapley import ESTIMATORS, coalition_jobs, make_estimator


def fail(message):
    """Stop with one line. An exception raised while planning would reach the user as a
    multi-line Snakemake block instead."""
    sys.exit(f"svnup: {message}")


try:
    cfg.validate(config)
except cfg.ConfigError as error:
    fail(error)

# Each failed job's reason and log path on the console, also where the profile's quiet console
# drops Snakemake's error block (svnup.joblog).
report_failed_jobs(snakemake_logger)


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    sparsity=r"[0-9][0-9.]*",
    allocation="|".join(ALLOCATIONS),
    pruner="|".join(PRUNERS),
    estimator="|".join(ESTIMATORS),
    metric="|".join(METRICS),
    key=r"[0-9a-f]{12}",
    store=r"[0-9a-f]{12}",
    job=r"[a-z0-9-]+",
    dataset=r"[A-Za-z0-9-]+",


@functools.cache
def model_settings(name):
    """Effective settings of model ``name``, computed once (one-line error if unknown)."""
    try:
        return cfg.model_settings(config, name)
    except cfg.ConfigError as error:
        fail(error)


def settings(wildcards):
    """Effective settings of the model named in the target path."""
    return model_settings(wildcards.model)


def target(wildcards):
    """The target sparsity of the path, checked against (0, 1) and the allocation bounds."""
    try:
        value = float(wildcards.sparsity)
        cfg.check_target(
            settings(wildcards), value, key=f"target path s{wildcards.sparsity}"
        )
    except (ValueError, cfg.ConfigError) as error:
        fail(error)
    return value


def logged(command):
    """A long stage's shell command: everything it prints goes to its log, and its progress bars
    (stderr; its messages go to stdout) to the terminal as well, so a long step shows how far it
    is. The log is emptied first; then both writers append, so neither overwrites the other.
    """
    return f": > {{log}}; {command} 2>&1 >> {{log}} | tee -a {{log}} >&2"


def as_json(spec):
    return json.dumps(spec, sort_keys=True)


def checked(wildcards, spec, name="key"):
    """The spec of a keyed path; a key that the current config does not produce is an error."""
    expected = cfg.key(spec)
    if getattr(wildcards, name) != expected:
        fail(
            f"{name} {getattr(wildcards, name)} does not match the current config "
            f"(expected {expected}); request the user-facing targets instead"
        )
    return as_json(spec)


def game_settings(wildcards, spec_of, name="key"):
    """The model's settings at the probe sparsity and probe pruner whose ``spec_of`` key is the
    path's ``name``: games are played at the Shapley probe and at every level a damage curve asks
    for, with each run's pruner when ``probe_pruner`` is ``match``."""
    for variant in cfg.games(settings(wildcards)):
        if cfg.key(spec_of(variant)) == getattr(wildcards, name):
            return variant
    raise WorkflowError(
        f"{name} {getattr(wildcards, name)} does not match the current config; "
        "request the user-facing targets instead"
    )


def store_settings(wildcards):
    return game_settings(wildcards, cfg.store_spec, name="store")


def shapley_settings(wildcards):
    return game_settings(wildcards, lambda s: cfg.shapley_spec(s, wildcards.estimator))


def curve_settings(wildcards):
    """The run settings whose damage-curve spec has the path's key (with ``probe_pruner: match``
    each pruner has a curve of its own)."""
    spec_of = lambda s, pruner: cfg.score_spec(s, wildcards.allocation, pruner)
    return cfg.for_pruner(
        settings(wildcards), pruner_with_key(wildcards, spec_of, "curve")
    )


def curve_inputs(wildcards):
    """The Shapley values at every level of a damage-curve method's levels (none for
    svnup-types, whose curve is its type games alone)."""
    s = curve_settings(wildcards)
    spec = cfg.score_spec(s, wildcards.allocation, None)
    if "shapley" not in spec:
        return []
    estimator = ALLOCATIONS[wildcards.allocation].source.name
    return [
        shapley_path(wildcards.model, cfg.at_probe(s, p), estimator)
        for p in spec["levels"]
    ]


def type_game_settings(wildcards):
    return game_settings(wildcards, cfg.type_game_spec, name="store")


def curve_type_games(wildcards):
    """The type games at every level of a damage curve that splits players by layer type
    (``split: types``); none for one that does not."""
    s = curve_settings(wildcards)
    spec = cfg.score_spec(s, wildcards.allocation, None)
    if "type_games" not in spec:
        return []
    return [type_game_path(wildcards.model, cfg.at_probe(s, p)) for p in spec["levels"]]


def curve_spec_json(wildcards):
    return as_json(
        cfg.score_spec(curve_settings(wildcards), wildcards.allocation, None)
    )


def local_inputs(*paths):
    """Inputs produced by this workflow (paths under results/); hub ids are not files."""
    return [p for p in paths if cfg.is_workflow_path(p)]


def model_path(wildcards):
    """The folder the model's stages load (a GGUF entry's conversion; see cfg.model_dir)."""
    return cfg.model_dir(settings(wildcards))


def gguf_file(wildcards):
    """The GGUF file whose conversion is the path's folder: a configured entry's file with that
    content (any of them, when several entries name the same file)."""
    wanted = f"{cfg.GGUF_FOLDER}/{wildcards.key}"
    for name, entry in config["models"].items():
        if gguf_files.is_gguf(entry["path"]):
            try:
                if cfg.model_dir(model_settings(name)) == wanted:
                    return str(gguf_files.locate(entry["path"]))
            except ValueError:
                continue  # an entry not asked for may name a package that is not installed
    fail(
        f"{wanted} is the conversion of no GGUF file of the current config; "
        "request the user-facing targets instead"
    )


# --- where each keyed intermediate lives --------------------------------------------------


def calibration_path(model, s):
    return (
        f"results/{model}/calibration/{cfg.key(cfg.calibration_spec(s))}/calibration.h5"
    )


def probe_path(model, s):
    return f"results/{model}/probe/{cfg.key(cfg.probe_spec(s))}/masks.h5"


def store_dir(model, s):
    return f"results/{model}/coalitions/{cfg.key(cfg.store_spec(s))}"


def job_paths(model, s, estimator):
    params = cfg.estimator_params(s, estimator)
    planned = make_estimator(
        n_blocks=cfg.n_players(s),
        name=estimator,
        **{k: v for k, v in params.items() if k != "estimator"},
    )
    folder = f"{store_dir(model, s)}/{estimator}/{cfg.key(params)}"
    return [f"{folder}/{job}.h5" for job in coalition_jobs(planned)]


def type_game_path(model, s):
    return f"results/{model}/type-games/{cfg.key(cfg.type_game_spec(s))}/damage.json"


def shapley_path(model, s, estimator=None):
    estimator = estimator or s["shapley"]["estimator"]
    key = cfg.key(cfg.shapley_spec(s, estimator))
    return f"results/{model}/shapley/{estimator}/{key}/scores.json"


def scores_path(model, s, allocation, sparsity, pruner):
    """The per-block scores allocation method ``allocation`` reads (None for uniform)."""
    source = ALLOCATIONS[allocation].source
    if source is None:
        return None
    if source.kind == "shapley":
        return shapley_path(model, cfg.for_pruner(s, pruner), source.name)
    key = cfg.key(cfg.score_spec(s, allocation, pruner))
    if source.kind in cfg.LEVELLED:
        return f"results/{model}/curves/{allocation}/{key}/scores.json"
    if source.kind == "metric":
        return f"results/{model}/metrics/{source.name}/{key}/scores.json"
    return f"results/{model}/search/{allocation}/{key}/s{sparsity}.json"


def database_path(model, s, allocation, sparsity, pruner):
    """The level database a search of ``allocation`` reads (None for a method without one)."""
    spec = cfg.database_spec(s, allocation, pruner)
    if spec is None:
        return None
    return f"results/{model}/levels/{allocation}/{cfg.key(spec)}/s{sparsity}.h5"


def budget_path(model, s, allocation, sparsity, pruner):
    key = cfg.key(cfg.budget_spec(s, allocation, pruner))
    return f"results/{model}/budget/{allocation}/{key}/s{sparsity}.json"


def run_dir(model, s, allocation, sparsity, pruner):
    key = cfg.key(cfg.prune_spec(s, allocation, float(sparsity), pruner))
    return f"results/{model}/runs/{allocation}/s{sparsity}/{pruner}/{key}"


def target_folder(wildcards):
    return f"results/{wildcards.model}/s{wildcards.sparsity}"


def run_folder(wildcards):
    """The keyed run folder of a (model, allocation, sparsity, pruner) target."""
    return run_dir(
        wildcards.model,
        settings(wildcards),
        wildcards.allocation,
        wildcards.sparsity,
        wildcards.pruner,
    )


def dense_dir(model, s):
    return f"results/{model}/runs/dense/{cfg.key(cfg.model_spec(s))}"


def eval_paths(folder, s):
    return [
        f"{folder}/eval/{cfg.eval_id(s, d)}.json" for d in s["evaluation"]["datasets"]
    ]


def eval_spec_of(wildcards):
    """The spec of the configured evaluation whose file stem is ``wildcards.dataset``."""
    s = settings(wildcards)
    for dataset in s["evaluation"]["datasets"]:
        if cfg.eval_id(s, dataset) == wildcards.dataset:
            return as_json(cfg.eval_spec(s, dataset))
    fail(
        f"{wildcards.dataset} is not an evaluation of the current config "
        "(evaluation.datasets, evaluation.split or seqlen changed?)"
    )


# --- runtime: how a job runs on this machine, never part of a cache key ---------------------


def device(wildcards):
    return settings(wildcards)["device"]


def gpus(wildcards):
    return 1 if device(wildcards).startswith("cuda") else 0


def runtime_resources():
    """Device, batch size and offload as job resources: resources, unlike params, never make
    Snakemake re-run a job, so moving to another machine recomputes nothing."""
    return dict(
        gpu=gpus,
        device=device,
        batch_size=lambda wildcards: settings(wildcards)["batch_size"],
        offload=lambda wildcards: str(settings(wildcards)["offload"]).lower(),
    )


# --- inputs that depend on the allocation method and the report ----------------------------


def run_budget(wildcards):
    """The budget of a (model, allocation, sparsity, pruner) run."""
    return budget_path(
        wildcards.model,
        settings(wildcards),
        wildcards.allocation,
        wildcards.sparsity,
        wildcards.pruner,
    )


def pruner_with_key(wildcards, spec_of, what):
    """A pruner whose run settings give ``spec_of`` the path's key: a budget or curve differs by
    pruner only where a search or a ``match`` probe uses the run's pruner; else any pruner fits.
    """
    s = settings(wildcards)
    for pruner in PRUNERS:
        if cfg.key(spec_of(cfg.for_pruner(s, pruner), pruner)) == wildcards.key:
            return pruner
    fail(
        f"{what} key {wildcards.key} does not match the current config; "
        "request the user-facing targets instead"
    )


def budget_pruner(wildcards):
    spec_of = lambda s, pruner: cfg.budget_spec(s, wildcards.allocation, pruner)
    return pruner_with_key(wildcards, spec_of, "budget")


def budget_spec_json(wildcards):
    s = settings(wildcards)
    return as_json(cfg.budget_spec(s, wildcards.allocation, budget_pruner(wildcards)))


def _spec_with_key(wildcards, candidates, what):
    """The spec among ``candidates`` whose key is the path's (one-line error if none is)."""
    for spec in candidates:
        if spec is not None and cfg.key(spec) == wildcards.key:
            return as_json(spec)
    fail(
        f"{what} key {wildcards.key} does not match the current config; "
        "request the user-facing targets instead"
    )


def metric_spec_json(wildcards):
    """The metric spec of the allocation method that reads this metric with these parameters."""
    s = settings(wildcards)
    methods = [
        method
        for method, entry in ALLOCATIONS.items()
        if entry.source is not None
        and entry.source.kind == "metric"
        and entry.source.name == wildcards.metric
    ]
    return _spec_with_key(
        wildcards, [cfg.score_spec(s, m, None) for m in methods], "metric"
    )


def search_spec_json(wildcards):
    s = settings(wildcards)
    return _spec_with_key(
        wildcards,
        [cfg.score_spec(s, wildcards.allocation, p) for p in PRUNERS],
        "search",
    )


def search_pruner_of(wildcards):
    """The run pruner whose search spec has the path's key."""
    s = settings(wildcards)
    for pruner in PRUNERS:
        if cfg.key(cfg.score_spec(s, wildcards.allocation, pruner)) == wildcards.key:
            return pruner
    fail(
        f"search key {wildcards.key} does not match the current config; "
        "request the user-facing targets instead"
    )


def search_database(wildcards):
    """The level database of a search (none for a search that reads none)."""
    path = database_path(
        wildcards.model,
        settings(wildcards),
        wildcards.allocation,
        wildcards.sparsity,
        search_pruner_of(wildcards),
    )
    return [] if path is None else path


def search_start(wildcards):
    """The budget a search starts from (none for a search from uniform)."""
    s = settings(wildcards)
    start = cfg.search_start(s, wildcards.allocation, search_pruner_of(wildcards))
    if start is None:
        return []
    return budget_path(wildcards.model, s, start[0], wildcards.sparsity, start[1])


def levels_spec_json(wildcards):
    s = settings(wildcards)
    return _spec_with_key(
        wildcards,
        [cfg.database_spec(s, wildcards.allocation, p) for p in PRUNERS],
        "levels",
    )


def scores_input(wildcards):
    """The per-block scores a budget reads (none for uniform allocation)."""
    path = scores_path(
        wildcards.model,
        settings(wildcards),
        wildcards.allocation,
        wildcards.sparsity,
        budget_pruner(wildcards),
    )
    return [] if path is None else path


def checkpoint_sources(wildcards):
    """What a run's checkpoint is made from: every input of its prune job. The jobs that read the
    checkpoint take them as inputs too, so a changed budget or calibration re-runs them.
    """
    return {
        "budget": run_budget(wildcards),
        "calibration": calibration_path(wildcards.model, settings(wildcards)),
        "model": local_inputs(model_path(wildcards)),
    }


def checkpoint_report(result):
    """The prune report as an input of a job that reads the run's checkpoint and writes
    ``result(wildcards)``: ancient, so pruning again (to bring back a temporary checkpoint)
    leaves a finished result alone, unless that result was measured on another checkpoint than
    the current budget and calibration make; then an ordinary input, so the job runs again after
    pruning. Snakemake does not look at a job's own inputs once a job it depends on has to run,
    so an edited budget alone would not re-run it.
    """

    def report(wildcards):
        wc = wildcards
        folder = f"results/{wc.model}/runs/{wc.allocation}/s{wc.sparsity}/{wc.pruner}/{wc.key}"
        s = settings(wc)
        spec = cfg.prune_spec(s, wc.allocation, target(wc), wc.pruner)
        sources = checkpoint_sources(wc)
        stale = cfg.key(spec) == wc.key and measured_elsewhere(
            result(wc, folder),
            spec,
            cfg.model_spec(s),
            sources["budget"],
            sources["calibration"],
        )
        return f"{folder}/prune.json" if stale else ancient(f"{folder}/prune.json")

    return report


def kept(path):
    """A file output Snakemake leaves in place until the job has replaced it (each stage writes
    atomically; a failed job's previous version is restored): another run that plans the same
    job (--nolock) must not delete the file this run's next job is reading. The stage CLI lets
    one process at a time run a job and the second keep the first's result (svnup.cli).
    """
    return update(path)


def probe_file(path):
    """A probe is kept only with keep_probes on; else until the coalition jobs that read it are
    done (with leave-one-out games one job a probe): a later game on the same probe makes it
    again, bit for bit, and the store still holds every coalition played."""
    return kept(path) if config.get("keep_probes", False) else temp(kept(path))


def pruned_model(path):
    """The pruned checkpoint is kept only when save_model is on; else its pruned layers only
    until evaluated."""
    return directory(path) if config.get("save_model", False) else temp(directory(path))


def report_budgets(wildcards):
    s = settings(wildcards)
    grid = s["targets"]
    return sorted(
        {
            budget_path(wildcards.model, s, allocation, sparsity, pruner)
            for sparsity in grid["sparsities"]
            for allocation in grid["allocations"]
            for pruner in grid["pruners"]
        }
    )


def note_option(wildcards):
    """The model's note (``models.<name>.note``) as the report's --note option, quoted for the
    shell; no option where the model has none."""
    note = settings(wildcards).get("note")
    return f"--note {shlex.quote(note)}" if note else ""


# --- user-facing targets ------------------------------------------------------------------


def ppl_targets(model):
    """The runs summary.csv gathers: the model's grid (its own targets, else targets.*)."""
    grid = model_settings(model)["targets"]
    paths = [f"results/{model}/dense/ppl.json"]
    for sparsity in grid["sparsities"]:
        for allocation in grid["allocations"]:
            for pruner in grid["pruners"]:
                paths.append(
                    f"results/{model}/s{sparsity}/{allocation}/{pruner}/ppl.json"
                )
    return paths


def default_targets():
    paths = []
    for model in config["targets"]["models"]:
        paths += [f"results/{model}/summary.csv", f"results/{model}/report/report.html"]
        paths += [
            f"results/{model}/s{s}/ppl.json"
            for s in model_settings(model)["targets"]["sparsities"]
        ]
    return paths


def print_outputs():
    for model in config["targets"]["models"]:
        summary = Path(f"results/{model}/summary.csv")
        html = Path(f"results/{model}/report/report.html")
        if summary.exists():
            print(f"svnup: summary of {model}: {summary.resolve()}")
        if html.exists():
            print(f"svnup: report of {model}: {html.resolve()}")
        note = model_settings(model).get("note")
        if note and summary.exists():
            print(f"svnup: note on {model}: {note}")
