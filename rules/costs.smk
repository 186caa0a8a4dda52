# The predicted GPU time of a run, printed once while planning, before any GPU job starts:
# svnup.costs prices the model jobs that the targets still need (outputs not on disk yet).
from svnup import costs
from svnup.data import split_file
from svnup.players import players_per_block


def requested_runs(model, s, paths):
    """(sparsity, allocation, pruner) of every pruned run the target paths ask for of ``model``,
    whether they ask for the dense evaluation and for the report (which plots the Shapley values
    at the probe sparsity); no paths: the default target's."""
    grid = config["targets"]
    everything = {
        (str(sparsity), allocation, pruner)
        for sparsity in grid["sparsities"]
        for allocation in {*grid["allocations"], s["allocation"]["method"]}
        for pruner in {*grid["pruners"], s["pruner"]}
    }
    if not paths:
        return everything, True, True
    runs, dense, plots = set(), False, False
    for path in paths:
        parts = Path(path).parts
        if len(parts) < 3 or parts[:2] != ("results", model):
            continue
        first, rest = parts[2], parts[3:]
        if first in ("summary.csv", "report"):
            runs |= everything
            dense = True
            plots = plots or first == "report"
        elif first == "dense":
            dense = True
        elif first.startswith("s") and rest and rest[-1] == "ppl.json":
            allocation = rest[0] if len(rest) >= 2 else s["allocation"]["method"]
            pruner = rest[1] if len(rest) == 3 else s["pruner"]
            runs.add((first[1:], allocation, pruner))
    return runs, dense, plots


def game_jobs(model, game, estimator):
    """The coalition jobs of one game whose outputs are missing (``estimator`` None: the
    configured one), and its probe job where they need a probe that is not on disk (a probe
    removed after its games, keep_probes off, is made again only for a game still to play).
    """
    shapley = game["shapley"]
    estimator = estimator or shapley["estimator"]
    n, seqlen = game["calibration"]["nsamples"], game["seqlen"]
    coalitions = {}
    per_block = players_per_block(cfg.players(game))
    bits = [
        ((1 << per_block) - 1) << (per_block * b) for b in range(cfg.n_blocks(game))
    ]
    params = cfg.estimator_params(game, estimator)
    planned = make_estimator(
        n_blocks=len(bits) * per_block,
        name=estimator,
        **{k: v for k, v in params.items() if k != "estimator"},
    )
    paths = job_paths(model, game, estimator)
    for path, masks in zip(paths, coalition_jobs(planned).values(), strict=True):
        if not Path(path).exists():
            skip = shapley["ablation"] == "skip"
            forwards = costs.trie_forwards(masks, bits, skip=skip)
            coalitions[path] = costs.Job(
                "coalitions",
                shapley["eval_samples"],
                seqlen,
                forwards=forwards,
                coalitions=len(masks),
            )
    probe = probe_path(model, game)
    if coalitions and shapley["ablation"] == "prune" and not Path(probe).exists():
        return {
            probe: costs.Job("probe", n, seqlen, shapley["probe_pruner"]),
            **coalitions,
        }
    return coalitions


def type_game_jobs(model, game):
    """The type game at one level where its output is missing (``split: types``, svnup-types):
    the dense coalition and one a layer type over ``layers`` players, and its probe where not
    on disk."""
    path = type_game_path(model, game)
    if Path(path).exists():
        return {}
    n_blocks = cfg.n_blocks(game)
    per_block = cfg.n_players(
        {**game, "shapley": {**game["shapley"], "players": "layers"}}
    )
    per_block //= n_blocks
    bits = [((1 << per_block) - 1) << (per_block * b) for b in range(n_blocks)]
    masks = [0] + [
        sum(1 << (per_block * b + t) for b in range(n_blocks)) for t in range(per_block)
    ]
    jobs = {
        path: costs.Job(
            "coalitions",
            game["shapley"]["eval_samples"],
            game["seqlen"],
            forwards=costs.trie_forwards(masks, bits, skip=False),
            coalitions=len(masks),
        )
    }
    probe = probe_path(model, game)
    if not Path(probe).exists():
        n = game["calibration"]["nsamples"]
        shapley = game["shapley"]
        jobs[probe] = costs.Job("probe", n, game["seqlen"], shapley["probe_pruner"])
    return jobs


def evaluation_jobs(folder, s):
    n_windows = s["evaluation"].get("windows")
    jobs = {}
    for dataset, path in zip(
        s["evaluation"]["datasets"], eval_paths(folder, s), strict=True
    ):
        if Path(path).exists():
            continue
        local = (
            None
            if cfg.is_workflow_path(dataset)
            else split_file(dataset, s["evaluation"]["split"])
        )
        size = local.stat().st_size if local is not None else None
        windows = costs.eval_windows(dataset, s["seqlen"], n_windows, size)
        jobs[path] = costs.Job("evaluate", windows, s["seqlen"])
    return jobs


def planned_model_jobs(model, s, paths):
    """The model jobs the targets still need, by output path, and the kinds of GPU work that
    are not priced (searches, zero-shot evaluations)."""
    n, seqlen = s["calibration"]["nsamples"], s["seqlen"]
    runs, dense, plots = requested_runs(model, s, paths)
    jobs, unpriced = {}, set()
    if runs and not Path(calibration_path(model, s)).exists():
        jobs[calibration_path(model, s)] = costs.Job("calibrate", n, seqlen)
    for sparsity, allocation, pruner in sorted(runs):
        folder = run_dir(model, s, allocation, sparsity, pruner)
        if Path(f"{folder}/prune.json").exists():
            jobs |= evaluation_jobs(folder, s)
            continue
        source = ALLOCATIONS[allocation].source
        scores = scores_path(model, s, allocation, sparsity, pruner)
        if source is not None and not Path(scores).exists():
            run = (
                cfg.for_pruner(s, pruner)
                if source.kind in ("shapley", *cfg.LEVELLED)
                else s
            )
            if source.kind == "shapley":
                jobs |= game_jobs(model, run, source.name)
            elif source.kind in cfg.LEVELLED:
                spec = cfg.score_spec(run, allocation, None)
                for level in spec["levels"]:
                    if "shapley" in spec:
                        jobs |= game_jobs(model, cfg.at_probe(run, level), source.name)
                    if "type_games" in spec:
                        jobs |= type_game_jobs(model, cfg.at_probe(run, level))
            elif source.kind == "search":
                unpriced.add(f"the {allocation} search")
        jobs[f"{folder}/prune.json"] = costs.Job("prune", n, seqlen, pruner)
        jobs |= evaluation_jobs(folder, s)
    if dense:
        jobs |= evaluation_jobs(dense_dir(model, s), s)
    report_game = cfg.for_pruner(s, s["pruner"])
    if plots and not Path(shapley_path(model, report_game)).exists():
        jobs |= game_jobs(model, report_game, None)
    if s["evaluation"].get("zero_shot"):
        unpriced.add("zero-shot evaluations")
    return jobs, unpriced


def announce_gpu_time():
    """Print each cuda model's predicted GPU time for this invocation's targets, once."""
    if not workflow.is_main_process:
        return
    args = command_line()
    if args is not None and (args.unlock or args.lint or args.cleanup_metadata):
        return
    paths = list(getattr(args, "targets", None) or [])
    named = {m for m in map(costs.result_model, paths) if m is not None}
    for model in sorted(named or config["targets"]["models"]):
        s = model_settings(model)
        if not s["device"].startswith("cuda") or cfg.is_workflow_path(s["path"]):
            continue
        jobs, unpriced = planned_model_jobs(model, s, paths)
        if not jobs:
            continue
        try:
            shape = costs.Shape.from_config(
                costs.model_config(s["path"], s["revision"])
            )
        except (OSError, KeyError, ValueError) as error:
            print(
                f"svnup: no GPU time predicted for {model} ({error.__class__.__name__})"
            )
            continue
        dtype_bytes = 4 if s["dtype"] == "float32" else 2
        line = costs.summary(model, shape, list(jobs.values()), dtype_bytes)
        if unpriced:
            line += "; not priced: " + ", ".join(sorted(unpriced))
        print(line)


announce_gpu_time()
