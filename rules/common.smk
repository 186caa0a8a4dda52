import json
import sys
from pathlib import Path

from svnup import config as cfg
from svnup.shapley import coalition_jobs, make_estimator

try:
    cfg.validate(config)
except cfg.ConfigError as error:
    sys.exit(f"svnup: {error}")


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    sparsity=r"[0-9][0-9.]*",
    allocation="svnup|owl|loo|uniform",
    pruner="wanda|sparsegpt|magnitude",
    estimator="exact|swsv|permutation|loo",
    key=r"[0-9a-f]{12}",
    store=r"[0-9a-f]{12}",
    job=r"[a-z0-9-]+",
    dataset=r"[A-Za-z0-9-]+",


def settings(wildcards):
    """Effective settings of the model named in the target path (one-line error if unknown)."""
    try:
        return cfg.model_settings(config, wildcards.model)
    except cfg.ConfigError as error:
        raise WorkflowError(str(error)) from None


def target(wildcards):
    """The target sparsity of the path, checked against (0, 1) and the allocation bounds."""
    try:
        value = float(wildcards.sparsity)
        cfg.check_target(
            settings(wildcards), value, key=f"target path s{wildcards.sparsity}"
        )
    except (ValueError, cfg.ConfigError) as error:
        raise WorkflowError(str(error)) from None
    return value


def as_json(spec):
    return json.dumps(spec, sort_keys=True)


def checked(wildcards, spec, name="key"):
    """The spec of a keyed path; a key that the current config does not produce is an error."""
    expected = cfg.key(spec)
    if getattr(wildcards, name) != expected:
        raise WorkflowError(
            f"{name} {getattr(wildcards, name)} does not match the current config "
            f"(expected {expected}); request the user-facing targets instead"
        )
    return as_json(spec)


def local_inputs(*paths):
    """Inputs produced by this workflow (the demo model and corpus); hub ids are not files."""
    return [p for p in paths if cfg.is_workflow_path(p)]


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
        n_blocks=cfg.n_blocks(s),
        name=estimator,
        **{k: v for k, v in params.items() if k != "estimator"},
    )
    folder = f"{store_dir(model, s)}/{estimator}/{cfg.key(params)}"
    return [f"{folder}/{job}.h5" for job in coalition_jobs(planned)]


def shapley_path(model, s, estimator=None):
    estimator = estimator or s["shapley"]["estimator"]
    key = cfg.key(cfg.shapley_spec(s, estimator))
    return f"results/{model}/shapley/{estimator}/{key}/shapley.h5"


def owl_path(model, s):
    return f"results/{model}/owl/{cfg.key(cfg.owl_spec(s))}/outliers.json"


def budget_path(model, s, allocation, sparsity):
    key = cfg.key(cfg.budget_spec(s, allocation))
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
    raise WorkflowError(
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


def importance_input(wildcards):
    s = settings(wildcards)
    if wildcards.allocation == "svnup":
        return shapley_path(wildcards.model, s)
    if wildcards.allocation == "loo":
        return shapley_path(wildcards.model, s, "loo")
    if wildcards.allocation == "owl":
        return owl_path(wildcards.model, s)
    return []


def pruned_model(path):
    """The pruned checkpoint is kept only when save_model is on; else only until evaluated."""
    return directory(path) if config.get("save_model", False) else temp(directory(path))


def report_budgets(wildcards):
    s = settings(wildcards)
    grid = config["targets"]
    return [
        budget_path(wildcards.model, s, allocation, sparsity)
        for sparsity in grid["sparsities"]
        for allocation in grid["allocations"]
    ]


# --- user-facing targets ------------------------------------------------------------------


def ppl_targets(model):
    grid = config["targets"]
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
            f"results/{model}/s{s}/ppl.json" for s in config["targets"]["sparsities"]
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
