# Checks before planning: included last, so every path helper of the rules is defined.
import itertools


def command_line():
    """Snakemake's own command line, parsed again (None if it cannot be read: the workflow may be
    run through Snakemake's Python API)."""
    try:
        from snakemake.cli import get_argument_parser

        return get_argument_parser().parse_known_args(sys.argv[1:])[0]
    except (Exception, SystemExit):
        return None


def intermediates(model, s, sparsities):
    """Files of ``model`` that the current config's jobs read, wherever they exist already."""
    grid = s["targets"]
    allocations = {*grid["allocations"], s["allocation"]["method"]}
    pruners = {*grid["pruners"], s["pruner"]}
    estimators = {s["shapley"]["estimator"]} | {
        ALLOCATIONS[a].source.name
        for a in allocations
        if ALLOCATIONS[a].source and ALLOCATIONS[a].source.kind == "shapley"
    }
    paths = [calibration_path(model, s)]
    for game in cfg.games(s):
        paths.append(probe_path(model, game))
        for estimator in estimators - {None}:
            paths += job_paths(model, game, estimator)
    dense = dense_dir(model, s)
    paths += [
        *eval_paths(dense, s),
        *zeroshot_paths(dense, s),
        f"results/{model}/dense/ppl.json",
    ]
    for sparsity, allocation, pruner in itertools.product(
        sparsities, allocations, pruners
    ):
        folder = run_dir(model, s, allocation, sparsity, pruner)
        paths += [
            database_path(model, s, allocation, sparsity, pruner),
            scores_path(model, s, allocation, sparsity, pruner),
            budget_path(model, s, allocation, sparsity, pruner),
            f"{folder}/prune.json",
            f"{folder}/model",
            *eval_paths(folder, s),
            *zeroshot_paths(folder, s),
            f"results/{model}/s{sparsity}/{allocation}/{pruner}/ppl.json",
            f"results/{model}/s{sparsity}/{allocation}/ppl.json",
            f"results/{model}/s{sparsity}/ppl.json",
        ]
    return sorted({p for p in paths if p})


def run_budgets(model, s, sparsities):
    """(budget, its target, the prune report made from it) of every run of the current config."""
    grid = config["targets"]
    for sparsity, allocation, pruner in itertools.product(
        sparsities,
        {*grid["allocations"], s["allocation"]["method"]},
        {*grid["pruners"], s["pruner"]},
    ):
        budget = budget_path(model, s, allocation, sparsity, pruner)
        pruning = f"{run_dir(model, s, allocation, sparsity, pruner)}/prune.json"
        yield budget, float(sparsity), pruning


def jobs_run_here():
    """Whether this invocation's jobs run on this machine: the executor that Snakemake's command
    line chose (its profiles included) executes locally, as the default one does, while a cluster
    executor submits from a login node that may have no GPU. Snakemake reads the Snakefile before
    it hands the executor to the workflow, so the executor is read from the frame of its command
    line's ``args_to_api``; None when Snakemake was not started from its command line.
    """
    frame = sys._getframe()
    while frame is not None:
        if (
            frame.f_code.co_name == "args_to_api"
            and "executor_plugin" in frame.f_locals
        ):
            return frame.f_locals["executor_plugin"].common_settings.local_exec
        frame = frame.f_back
    return None


def check_before_planning():
    """Everything that can fail before the first job, checked now, each in one line: the target
    paths asked for, every target model (its folder, weights and family, player count against
    the estimator, context length against seqlen, datasets, splits and their first rows, its
    device when jobs run here, its zero-shot tasks), and the intermediate files its jobs would
    read. A damaged file is named before a job that reads it deletes its own previous output; a
    budget must also be an allocation for its run (svnup.provenance).
    """
    from svnup.content import check_intact, refold
    from svnup.io import REBUILD, CorruptFileError
    from svnup.provenance import check_pruned_with, read_budget
    from svnup.store import check_store

    if not workflow.is_main_process:
        return  # a cluster job: the submitting process has checked
    args = command_line()
    if args is not None and (args.unlock or args.lint or args.cleanup_metadata):
        return
    asked = {}  # model -> sparsities its target paths name
    try:
        for path in getattr(args, "targets", None) or []:
            model = preflight.target_model(config, path)
            if model:
                asked.setdefault(model, set())
                part = Path(path).parts[2]
                if part.startswith("s") and part[1:2].isdigit():
                    asked[model].add(part[1:])
        for model in sorted(asked or config["targets"]["models"]):
            s = model_settings(model)
            preflight.check_model(s, model)
            if jobs_run_here():
                preflight.check_device(s, model)
            check_zero_shot(model, s)
            # a GGUF file's conversion is a folder the workflow builds
            folder = cfg.model_dir(s)
            if cfg.is_workflow_path(folder):
                check_intact(folder, refold(folder, "converts"))
            for game in cfg.games(s):
                check_store(f"{store_dir(model, game)}/store")
            sparsities = {str(x) for x in s["targets"]["sparsities"]} | asked.get(
                model, set()
            )
            for path in intermediates(model, s, sorted(sparsities)):
                check_intact(
                    path, refold(path) if Path(path).name == "model" else REBUILD
                )
            for budget, target, pruning in run_budgets(model, s, sorted(sparsities)):
                if Path(budget).is_file():
                    read_budget(budget, target, spec_key=Path(budget).parent.name)
                    check_pruned_with(budget, pruning)
    except (cfg.ConfigError, CorruptFileError) as error:
        fail(error)


check_before_planning()
