"""python -m svnup STAGE: one command per pipeline stage, as the workflow's rules call them.

Structured arguments (``--spec``, ``--model``, ``--estimator``) are JSON strings; paths are plain
arguments; ``--device``, ``--batch-size``, ``--offload`` and ``--threads`` say how to run, never
what to compute. Each option is passed to the ``svnup.stages`` function of the same name as the
parameter of the same name; the JSON options are checked against the stage's schema first
(``svnup.specs``). Every error is one line on stderr, ``svnup STAGE: error: ...``: bad input (a
file that cannot be read is named first, ``<file>: <what>: <fix>``) with exit status 2, anything
unexpected with its type and message and exit status 1, its traceback on stdout (the rule's log).

One process at a time runs the job of a given output: a second one (another workflow run with
``--nolock``, or a run after ``--unlock`` while an orphaned job still runs) waits for the first,
or takes over from a dead one, and keeps what the first wrote instead of computing it again.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from svnup import specs, stages
from svnup.io import write_json

# stage -> (help, options); "?" marks an optional path, "*" a list of paths, "!" a flag
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "convert": ("a GGUF checkpoint as a float32 Hugging Face folder", ("gguf", "out_dir")),
    "calibrate": ("sample calibration data, record dense statistics", ("spec", "out")),
    "probe": ("probe masks of the prune ablation", ("spec", "model", "calibration", "out")),
    "coalitions": (
        "evaluate the coalitions of one job that the store does not hold",
        ("spec", "model", "estimator", "job", "calibration", "masks?", "store", "out"),
    ),
    "shapley": ("aggregate coalition jobs into per-block values", ("spec", "jobs*", "out", "csv")),
    "type_game": (
        "the damage of each linear-layer type pruned in every block at once (split: types, "
        "svnup-types)",
        ("spec", "model", "calibration", "masks", "store", "out"),
    ),
    "curve": (
        "a [level, block] table of Shapley values at several probe sparsities, and/or the type "
        "games' [level, type] table",
        ("spec", "scores*", "out", "type_games*"),
    ),
    "metric": (
        "a per-block metric of the dense model (OWL, DLP, AlphaPruning)",
        ("spec", "model", "calibration?", "out"),
    ),
    "levels": (
        "every linear layer pruned at levels around one target (EvoPress's database)",
        ("spec", "model", "sparsity", "calibration", "out"),
    ),
    "search": (
        "search an allocation for one target (ATP, EvoPress)",
        ("spec", "model", "sparsity", "calibration", "out", "database?", "start?"),
    ),
    "budget": (
        "per-block sparsities for one target",
        ("spec", "sparsity", "calibration", "scores?", "out"),
    ),
    "prune": (
        "prune with a budget and save the checkpoint",
        ("spec", "model", "budget", "calibration", "out_dir", "report", "layers_only!"),
    ),
    "recipe": (
        "llm-compressor recipe of an allocation (SparseGPT, Wanda)",
        ("budget", "pruner", "model", "out", "nm?"),
    ),
    "evaluate": (
        "perplexity of a checkpoint on one dataset",
        ("spec", "model", "model_dir", "out"),
    ),
    "zeroshot": (
        "zero-shot accuracy of a checkpoint (lm-evaluation-harness)",
        ("spec", "model", "model_dir", "out"),
    ),
    "zeroshot_task": (
        "a local multiple-choice task built from a text source",
        ("spec", "out_dir"),
    ),
    "collect": (
        "assemble ppl.json",
        (
            "name",
            "sparsity",
            "allocation",
            "pruner",
            "evaluations*",
            "out",
            "budget?",
            "report?",
            "zero_shot?",
            "checkpoint?",
            "model?",
        ),
    ),
    "summary": ("gather the given ppl.json files into a CSV", ("runs*", "out")),
    "report": (
        "figures and an HTML report of a model",
        ("results", "out_dir", "summary", "shapley?", "budgets*", "recommended", "note"),
    ),
}
# option -> help text; every option of every stage has one (tests/test_cli.py checks)
OPTION_HELP = {
    "gguf": "GGUF checkpoint file (model and tokenizer)",
    "spec": "JSON: the settings this stage's result depends on (its cache-key material)",
    "model": 'JSON: the model, {"path": ..., "dtype": ...} (hub ids also "revision")',
    "nm": 'N:M semi-structured masks, e.g. "2:4" (N of each M weights of a row pruned)',
    "estimator": 'JSON: the Shapley estimator and its parameters, {"estimator": "swsv", ...}',
    "job": "which of the estimator's coalition jobs to run (e.g. window-000-004)",
    "calibration": "calibration record (HDF5) written by the calibrate stage",
    "masks": "probe masks (HDF5) written by the probe stage; needed by the prune ablation",
    "database": "linear layers pruned at levels (HDF5) written by the levels stage (EvoPress)",
    "start": "budget (JSON) a search starts from (EvoPress's start: svnup-fit)",
    "store": "coalition store folder shared by every job of this model and calibration",
    "out": "output file",
    "jobs": "coalition job files (HDF5) to aggregate",
    "type_games": "type game results (JSON), one a level in the levels' order (split: types)",
    "csv": "per-block values as CSV",
    "sparsity": "target sparsity: the parameter-weighted mean of the per-block sparsities",
    "scores": "per-block scores (JSON) of the allocation method: Shapley values, a metric",
    "budget": "per-block sparsities (JSON) written by the budget stage",
    "out_dir": "output folder",
    "layers_only": "save only the pruned layers, applied to the dense model where it is loaded",
    "report": "pruning report (JSON) written by the prune stage",
    "model_dir": "checkpoint folder (or hub id) to evaluate",
    "name": "model name as in the workflow config",
    "allocation": "allocation method of the run",
    "pruner": "pruner of the run",
    "evaluations": "evaluation results (JSON) to collect",
    "zero_shot": "zero-shot accuracies (JSON) to collect",
    "runs": "ppl.json files of the runs to tabulate",
    "checkpoint": "the pruned checkpoint kept on disk (save_model), recorded in ppl.json",
    "results": "the model's results folder (names the report)",
    "summary": "summary CSV written by the summary stage",
    "shapley": "Shapley values (scores JSON) to plot",
    "budgets": "budgets (JSON) whose per-block sparsities to plot",
    "recommended": "allocation method marked as the recommendation (the model's allocation.method)",
    "note": "one sentence on what the run can and cannot show, printed under the verdicts",
}
JSON_OPTIONS = {"spec", "model", "estimator"}
TEXT_OPTIONS = {"job", "name", "allocation", "pruner", "recommended", "note", "nm"}
PACKAGE = Path(__file__).resolve().parent
# how to recover from an OSError that names its file, by errno
OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path (a part of it is a file)",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "a file stands where a folder of the path should be; check the path",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.ENOSPC: "free some disk space and re-run",
    errno.EROFS: "write to a writable file system",
}


class _Parser(argparse.ArgumentParser):
    """A usage error in one line, like every other error of the command line."""

    def error(self, message: str):
        name = self.prog.removeprefix("python -m ")
        self.exit(2, f"{name}: error: {message}; see {self.prog} --help\n")


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({error.msg} at {where}): {text[:80]}"
        ) from None


def _add_option(parser: argparse.ArgumentParser, option: str) -> None:
    name = option.rstrip("?*!")
    flag = "--" + name.replace("_", "-")
    text = OPTION_HELP.get(name)
    if option.endswith("!"):
        parser.add_argument(flag, action="store_true", help=text)
    elif option.endswith("*"):
        parser.add_argument(flag, type=Path, nargs="*", default=[], help=text)
    elif name in JSON_OPTIONS:
        required = not option.endswith("?")
        parser.add_argument(flag, type=_json, required=required, default=None, help=text)
    elif name in TEXT_OPTIONS:
        parser.add_argument(flag, default=None, required=name == "job", help=text)
    elif name == "sparsity":
        parser.add_argument(flag, type=float, default=None, help=text)
    else:
        required = not option.endswith("?")
        parser.add_argument(flag, type=Path, required=required, default=None, help=text)


def _uses_model(stage: str) -> bool:
    return "runtime" in inspect.signature(getattr(stages, stage)).parameters


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N (N a number)")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward")
    parser.add_argument(
        "--offload",
        default="auto",
        choices=["auto", "true", "false"],
        help="keep weights on the CPU and move one block at a time to the device",
    )
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m svnup", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE", help="one of:")
    for stage, (text, options) in STAGES.items():
        stage_parser = sub.add_parser(stage, help=text, description=text)
        for option in options:
            _add_option(stage_parser, option)
        if _uses_model(stage):
            _add_runtime(stage_parser)
    sub.add_parser("demo", help="build the demo corpus or train the demo model")
    return parser


def _runtime(args: argparse.Namespace) -> dict:
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "offload": {"true": True, "false": False}.get(args.offload, "auto"),
    }


def run(args: argparse.Namespace) -> None:
    """Check the JSON options, then, as the only process running the job of these outputs, call
    the stage function with the parsed options as its keyword arguments."""
    from svnup.store import held

    values = vars(args)
    for option in ("spec", "model", "estimator"):
        if values.get(option) is not None:  # an optional one (collect's --model) may be absent
            specs.check(args.stage, option, values[option])
    outputs = _outputs(args.stage, values)
    record = outputs[0].with_name(f".{outputs[0].name}.job")
    before = _stamps(outputs)
    with held(outputs[0].with_name(f".{outputs[0].name}.lock")):
        after = _stamps(outputs)
        if after != before and _recorded(record) == after:
            logging.getLogger("svnup").info(
                "%s: written by another process running the same job (another workflow run) "
                "while this one waited; keeping it",
                ", ".join(map(str, outputs)),
            )
            return
        _call(args, values)
        write_json(record, {"stamps": _stamps(outputs)})


def _outputs(stage: str, values: dict) -> list[Path]:
    """The paths a stage writes (prune's ``--report`` is an output; collect's is an input)."""
    names = ("out", "out_dir", "csv", *(("report",) if stage == "prune" else ()))
    return [Path(values[name]) for name in names if values.get(name) is not None]


def _stamps(paths: list[Path]) -> list[list[int] | None]:
    """Each path's [inode, modification time], None where absent. Outputs that changed while a
    job waited for the lock, to the stamps the finished job recorded beside them, are that job's
    (each is replaced atomically); any other change (Snakemake restoring the previous version of
    a failed job's output) is not."""
    stamps = []
    for path in paths:
        try:
            status = path.stat()
        except FileNotFoundError:
            stamps.append(None)
        else:
            stamps.append([status.st_ino, status.st_mtime_ns])
    return stamps


def _recorded(record: Path) -> list | None:
    try:
        return json.loads(record.read_text())["stamps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _call(args: argparse.Namespace, values: dict) -> None:
    function = getattr(stages, args.stage)
    if _uses_model(args.stage):
        from svnup.gpus import claim_gpu

        values["runtime"] = _runtime(args)
        claim_gpu(values["runtime"])
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
    function(**{name: values[name] for name in inspect.signature(function).parameters})
    if _uses_model(args.stage):
        _log_resources()


def _log_resources() -> None:
    """What the job took, at its end in its log: CPU seconds and peak resident memory of the
    process (exact, where a workflow's benchmark record samples them every 30 s), and the peak
    GPU memory torch allocated, so a run's sizing can be read back."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux counts KiB
    message = (
        f"resources: {usage.ru_utime + usage.ru_stime:.1f} CPU s, "
        f"peak host memory {peak / 2**30:.3f} GiB"
    )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        message += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB"
    logging.getLogger("svnup").info(message)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from svnup.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Messages go to stdout (the rule's log); stderr carries progress bars and errors, which the
    # workflow also shows in the terminal. Library loading bars would only add noise there.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        run(args)
    except Exception as error:
        message, status = describe(error)
        if status == 2:
            logging.getLogger("svnup").debug("stage failed", exc_info=True)
        else:
            traceback.print_exception(error, file=sys.stdout)
        sys.stdout.flush()  # the log then ends with the reason, as the console shows it
        print(f"svnup {args.stage}: error: {message}", file=sys.stderr)
        return status
    return 0


def describe(error: Exception) -> tuple[str, int]:
    """The one line that reports ``error``, and the exit status: 2 for bad input (an error svnup
    raises about its input, a file that cannot be read), 1 for anything unexpected."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        fix = OS_FIXES.get(error.errno, "check the file and re-run")
        # the hidden siblings of an output (the temporary file it is written to, svnup.io's
        # atomic_path, and its job's lock and record) name the output
        name = re.sub(r"\.([^/]+)\.(tmp-[0-9]+|lock|job)$", r"\1", str(error.filename))
        return f"{name}: {error.strerror}: {fix}", 2
    if isinstance(error, ValueError | OSError) and _raised_in_svnup(error):
        return _one_line(error), 2
    return f"unexpected {type(error).__name__}: {_one_line(error)}; the traceback is in the log", 1


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or repr(error)


def _raised_in_svnup(error: Exception) -> bool:
    """Whether svnup's own code raised ``error`` (a library's ValueError is no message of ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)
