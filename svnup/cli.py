"""``python -m svnup STAGE ...``: one command per pipeline stage (what the workflow rules call).

Structured arguments (``--spec``, ``--model``, ``--estimator``) are JSON strings; paths are plain
arguments; ``--device``, ``--batch-size`` and ``--offload`` say how to run, never what to compute.
Errors in the input are reported in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from svnup import stages


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text[:80]}") from None


def _add(sub, name: str, help: str, *options: str) -> argparse.ArgumentParser:
    """A sub-command with the given options; option names decide their types."""
    parser = sub.add_parser(name, help=help, description=help)
    for option in options:
        if option in ("--spec", "--model", "--estimator"):
            parser.add_argument(option, type=_json, required=True)
        elif option == "--runtime":
            parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
            parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
            parser.add_argument("--offload", default="auto", choices=["auto", "true", "false"])
            parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
        elif option in ("--jobs", "--evaluations"):
            parser.add_argument(option, type=Path, nargs="*", default=[])
        elif option == "--sparsity":
            parser.add_argument(option, type=float)
        elif option.endswith("?"):
            parser.add_argument(option[:-1], type=Path, default=None)
        else:
            parser.add_argument(option, type=Path if option != "--job" else str, required=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m svnup", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True)
    _add(
        sub,
        "calibrate",
        "sample calibration data, record dense statistics",
        "--spec",
        "--runtime",
        "--out",
    )
    _add(
        sub,
        "probe",
        "probe masks of the prune ablation",
        "--spec",
        "--runtime",
        "--model",
        "--calibration",
        "--out",
    )
    _add(
        sub,
        "coalitions",
        "evaluate one job's coalitions",
        "--spec",
        "--runtime",
        "--model",
        "--estimator",
        "--job",
        "--calibration",
        "--masks?",
        "--store",
        "--out",
    )
    _add(
        sub,
        "shapley",
        "aggregate coalition jobs into per-block values",
        "--spec",
        "--jobs",
        "--out",
        "--csv",
    )
    _add(
        sub,
        "owl",
        "outlier density per block (OWL)",
        "--spec",
        "--runtime",
        "--model",
        "--calibration",
        "--out",
    )
    _add(
        sub,
        "budget",
        "per-block sparsities for a target",
        "--spec",
        "--sparsity",
        "--calibration",
        "--importance?",
        "--out",
    )
    _add(
        sub,
        "prune",
        "prune with a budget and save the checkpoint",
        "--spec",
        "--runtime",
        "--model",
        "--budget",
        "--calibration",
        "--out-dir",
        "--report",
    )
    _add(
        sub,
        "evaluate",
        "perplexity of a checkpoint on one dataset",
        "--spec",
        "--runtime",
        "--model",
        "--model-dir",
        "--out",
    )
    collect = _add(
        sub,
        "collect",
        "assemble ppl.json",
        "--evaluations",
        "--sparsity",
        "--budget?",
        "--report?",
        "--out",
    )
    for option in ("--name", "--allocation", "--pruner"):
        collect.add_argument(option, default=None)
    _add(sub, "summary", "gather a model's ppl.json files into a CSV", "--results", "--out")
    report = _add(sub, "report", "plots and an HTML report of a model", "--results", "--out-dir")
    report.add_argument("--shapley", type=Path, default=None)
    report.add_argument("--budgets", type=Path, nargs="*", default=[])
    report.add_argument("--summary", type=Path, required=True)
    sub.add_parser(
        "demo",
        help="build the demo corpus or train the demo model (see svnup.demo)",
        add_help=False,
    )
    return parser


def _runtime(args: argparse.Namespace) -> dict:
    offload = {"true": True, "false": False}.get(getattr(args, "offload", "auto"), "auto")
    return {
        "device": getattr(args, "device", "cpu"),
        "batch_size": getattr(args, "batch_size", 8),
        "offload": offload,
    }


def run(args: argparse.Namespace) -> None:
    stage = args.stage
    args.runtime = _runtime(args)
    if stage == "calibrate":
        stages.calibrate(args.spec, args.runtime, args.out)
    elif stage == "probe":
        stages.probe(args.spec, args.runtime, args.model, args.calibration, args.out)
    elif stage == "coalitions":
        stages.coalitions(
            args.spec,
            args.runtime,
            args.model,
            args.estimator,
            args.job,
            args.calibration,
            args.masks,
            args.store,
            args.out,
        )
    elif stage == "shapley":
        stages.shapley(args.spec, args.jobs, args.out, args.csv)
    elif stage == "owl":
        stages.owl(args.spec, args.runtime, args.model, args.calibration, args.out)
    elif stage == "budget":
        stages.budget(args.spec, args.sparsity, args.calibration, args.importance, args.out)
    elif stage == "prune":
        stages.prune(
            args.spec,
            args.runtime,
            args.model,
            args.budget,
            args.calibration,
            args.out_dir,
            args.report,
        )
    elif stage == "evaluate":
        stages.evaluate(args.spec, args.runtime, args.model, str(args.model_dir), args.out)
    elif stage == "collect":
        stages.collect(
            args.name,
            args.sparsity,
            args.allocation,
            args.pruner,
            args.evaluations,
            args.out,
            args.budget,
            args.report,
        )
    elif stage == "summary":
        stages.summary(args.results, args.out)
    elif stage == "report":
        from svnup.report import make_report

        make_report(args.results, args.out_dir, args.summary, args.shapley, args.budgets)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from svnup.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from svnup.gpus import claim_gpu

    claim_gpu(_runtime(args))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("svnup").debug("stage failed", exc_info=True)
        message = error.args[0] if error.args else repr(error)
        print(f"svnup {args.stage}: error: {message}", file=sys.stderr)
        return 2
    return 0
