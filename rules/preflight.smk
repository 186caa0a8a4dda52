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
    grid = config["targets"]
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
    read. A damaged file is named before a job that reads it deletes its own previous output.
    """
    from svnup.content import check_intact, refold
    from svnup.io import REBUILD, CorruptFileError
    from svnup.store import check_store

    if not workflow.is_main_process:
        return  # a cluster job: the submitting process has checked
    args = command_line()
    if args is not None and (args.unlock or args.lint or args.cleanup_metadata):
        return
    sparsities = {str(s) for s in config["targets"]["sparsities"]}
    models = set()
    try:
        for path in getattr(args, "targets", None) or []:
            model = preflight.target_model(config, path)
            if model:
                models.add(model)
                part = Path(path).parts[2]
                if part.startswith("s") and part[1:2].isdigit():
                    sparsities.add(part[1:])
        for model in sorted(models or config["targets"]["models"]):
            s = model_settings(model)
            preflight.check_model(s, model)
            if jobs_run_here():
                preflight.check_device(s, model)
            check_zero_shot(model, s)
            for game in cfg.games(s):
                check_store(f"{store_dir(model, game)}/store")
            for path in intermediates(model, s, sorted(sparsities)):
                check_intact(
                    path, refold(path) if Path(path).name == "model" else REBUILD
                )
    except (cfg.ConfigError, CorruptFileError) as error:
        fail(error)


check_before_planning()
