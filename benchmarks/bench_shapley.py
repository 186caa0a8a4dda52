"""SV-NUP study on c4-llama-12L: estimator accuracy, evaluator cost, allocation quality, defaults.

Why: SV-NUP rests on three claims that need numbers from one real model: sliding-window Shapley
(SWSV) ranks blocks like exact Shapley at a fraction of the coalitions, the prefix-sharing evaluator
makes those coalitions cheap, and allocating sparsity by Shapley value gives lower perplexity than
uniform, OWL and leave-one-out allocation. The last part picks the defaults (probe sparsity, lambda,
value transform) by the final perplexity they lead to.

All 4096 coalitions of the main probe sparsity are evaluated once; every estimator reads that
table. Coalition tables and pruned-model perplexities are cached under ``benchmarks/.cache`` so a
rerun only redoes what changed.

    nohup python benchmarks/bench_shapley.py > benchmarks/.cache/shapley.log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from svnup.allocation import allocate
from svnup.calibration import BlockMasks, dense_statistics, probe_masks
from svnup.data import calibration_samples, eval_stream
from svnup.evaluator import CoalitionEvaluator
from svnup.io import atomic_path
from svnup.metrics import owl_outlier_ratio
from svnup.models import BlockModel, linear_layers, load_model
from svnup.perplexity import stream_perplexity
from svnup.pruning import prune_model
from svnup.shapley import Exact, LeaveOneOut, ShapleyResult, SlidingWindow

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
C4 = SHARED / "data" / "c4" / "c4-validation-2k.jsonl"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-v1" / "test.jsonl"
TRANSFORMS: dict[str, Callable[[float], float]] = {
    "neg_nll": lambda mean_nll: -mean_nll,
    "neg_ppl": lambda mean_nll: -math.exp(mean_nll),
}
PRUNERS = ("wanda", "sparsegpt")
METHODS = ("uniform", "owl", "loo", "svnup")
NOISE_SE = 2.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=SHARED / "models" / "c4-llama-12L")
    p.add_argument("--nsamples", type=int, default=32, help="pruning calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shapley-nsamples", type=int, default=8, help="first n calibration windows")
    p.add_argument("--shapley-seqlen", type=int, default=256, help="their first tokens kept")
    p.add_argument("--probe", type=float, default=0.5, help="main probe sparsity (sections 1-3)")
    p.add_argument(
        "--exact-probes",
        type=float,
        nargs="*",
        default=None,
        help="probe sparsities that get all 2^L coalitions (default: --probe)",
    )
    p.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 6], help="SWSV widths")
    p.add_argument("--window", type=int, default=4, help="SWSV width used by SV-NUP")
    p.add_argument("--lam", type=float, default=0.2, help="SV-NUP and LOO lambda (section 3)")
    p.add_argument("--value", choices=sorted(TRANSFORMS), default="neg_nll")
    p.add_argument("--owl-lam", type=float, default=0.08)
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--pruners", nargs="+", choices=PRUNERS, default=list(PRUNERS))
    p.add_argument("--study-probes", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--study-lams", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--study-targets", type=float, nargs="+", default=[0.7])
    p.add_argument(
        "--ppl-windows",
        type=int,
        default=128,
        help="evenly spaced WikiText-2 test windows evaluated (0: all)",
    )
    p.add_argument(
        "--ppl-chunks", type=int, default=16, help="chunks for the paired noise estimate"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest when shared)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    p.add_argument("--out", type=Path, default=HERE / "results" / "shapley.md")
    args = p.parse_args(argv)
    for path in (args.model, C4, WIKITEXT):
        if not path.exists():
            p.error(f"{path} is missing; ../shared must sit beside the checkout (or pass --model)")
    sparsities = [args.probe, *args.targets, *args.study_probes, *args.study_targets]
    sparsities += args.exact_probes or []
    if not all(0 < s < 1 for s in sparsities):
        p.error(f"probe and target sparsities must lie in (0, 1), got {sparsities}")
    if not 0 < args.shapley_nsamples <= args.nsamples:
        p.error(f"--shapley-nsamples must be in [1, --nsamples={args.nsamples}]")
    if not 2 <= args.shapley_seqlen <= args.seqlen:
        p.error(f"--shapley-seqlen must be in [2, --seqlen={args.seqlen}]")
    if args.ppl_windows < 0 or args.ppl_chunks < 2:
        p.error("--ppl-windows must be >= 0 (0: all) and --ppl-chunks >= 2")
    if args.exact_probes is None:
        args.exact_probes = [args.probe]
    if args.probe not in args.exact_probes:
        p.error(f"--exact-probes must include the main --probe {args.probe}")
    return args


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list[str]:
    return [_row(*cells), _row(*("---" for _ in cells))]


def spearman(a: Iterable[float], b: Iterable[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    ra, rb = pd.Series(list(a)).rank(), pd.Series(list(b)).rank()
    return float(np.corrcoef(ra, rb)[0, 1])


def trie_forwards(masks: Iterable[int], n_blocks: int) -> int:
    """Block forwards of the prefix-sharing walk: one per distinct prefix of every length."""
    masks = set(masks)
    return sum(len({m & ((2 << b) - 1) for m in masks}) for b in range(n_blocks))


@dataclass
class Run:
    """Perplexity of one pruned model on the evaluation chunks."""

    mean_nll: float
    chunk_nll: list[float]
    prune_s: float
    eval_s: float

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)


class Study:
    """Model, data and caches shared by every section."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.args, self.log = args, log
        self.engine, tokenizer = load_model(args.model, batch_size=args.batch_size)
        self.n_blocks = self.engine.n_blocks
        self.dense = {k: v.clone() for k, v in self.engine.model.state_dict().items()}
        self.params = np.array(self.engine.block_params(), dtype=float)
        self.calibration = calibration_samples(
            tokenizer, str(C4), args.nsamples, args.seqlen, seed=args.seed, split="validation"
        )
        self.shapley_ids = self.calibration[: args.shapley_nsamples, : args.shapley_seqlen]
        self.stats = dense_statistics(self.engine, self.calibration)
        self.outlier_density = np.array(
            [
                owl_outlier_ratio(
                    {
                        name: (layer.weight.data, self.stats[b][name])
                        for name, layer in linear_layers(block).items()
                    },
                    args.owl_m,
                )
                for b, block in enumerate(self.engine.blocks)
            ]
        )
        stream = eval_stream(tokenizer, str(WIKITEXT), "test", args.seqlen, args.cache_dir / "tok")
        self.total_windows = stream.shape[1] // args.seqlen
        windows = stream[0, : self.total_windows * args.seqlen].view(-1, args.seqlen)
        if args.ppl_windows:
            picks = np.linspace(0, self.total_windows - 1, args.ppl_windows).round().astype(int)
            windows = windows[np.unique(picks)]
        self.eval_windows = windows.shape[0]
        self.chunks = [c.reshape(1, -1) for c in windows.tensor_split(args.ppl_chunks)]
        model_file = args.model / "model.safetensors"
        identity = {
            "model": str(args.model.resolve()),
            "weights": model_file.stat().st_size if model_file.exists() else None,
            "seed": args.seed,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
        }
        self.coalition_key = {
            **identity,
            "eval": [args.shapley_nsamples, args.shapley_seqlen],
            "probe_pruner": "wanda",
        }
        self.runs_path = args.cache_dir / f"runs-{_digest({**identity, 'ppl': self.ppl_key})}.json"
        self.runs: dict[str, dict] = (
            json.loads(self.runs_path.read_text()) if self.runs_path.exists() else {}
        )
        self.requested: set[str] = set()
        self.computed = 0
        self.tables: dict[float, dict[int, float]] = {}
        self.evaluations: dict[float, list[dict]] = {}

    @property
    def ppl_key(self) -> list:
        return [self.args.ppl_windows, self.args.ppl_chunks]

    def masks(self, probe: float) -> dict[int, BlockMasks]:
        return dict(enumerate(probe_masks(self.engine, self.stats, probe)))

    def table(self, probe: float, wanted: Iterable[int]) -> dict[int, float]:
        """Mean NLL of the Shapley evaluation set per ablated mask; evaluates only what is new."""
        path = (
            self.args.cache_dir / f"coalitions-{_digest({**self.coalition_key, 'p': probe})}.json"
        )
        data = json.loads(path.read_text()) if path.exists() else {"nll": {}, "evaluations": []}
        nll = {int(k): v for k, v in data["nll"].items()}
        todo = sorted(set(wanted) - set(nll))
        if todo:
            self.log(f"  probe {probe}: evaluating {len(todo)} coalitions")
            evaluator = CoalitionEvaluator(
                self.engine, self.shapley_ids, "prune", self.masks(probe)
            )

            def record(mask: int, nll_sum: float, n_tokens: int, seconds: float) -> None:
                nll[mask] = nll_sum / n_tokens

            stats = evaluator.evaluate(todo, record)
            data["evaluations"].append(asdict(stats))
            data["nll"] = {str(k): v for k, v in sorted(nll.items())}
            _write_json(path, data)
        self.tables[probe] = nll
        self.evaluations[probe] = data["evaluations"]
        return nll

    def estimate(self, estimator, probe: float, value: str) -> ShapleyResult:
        table, transform = self.tables[probe], TRANSFORMS[value]
        return estimator.estimate(lambda mask: transform(table[mask]))

    def perplexity(self, sparsities: np.ndarray, pruner: str) -> Run:
        """Prune the dense model with ``sparsities`` and measure it; cached by allocation.

        The dense weights are restored afterwards: probe masks and coalition tables must always
        see the dense model.
        """
        key = json.dumps([pruner, [round(float(s), 10) for s in sparsities]])
        self.requested.add(key)
        if key not in self.runs:
            start = time.perf_counter()
            try:
                if np.any(sparsities > 0):
                    prune_model(self.engine, self.calibration, list(sparsities), pruner)
                prune_s = time.perf_counter() - start
                run = self._measure(prune_s)
            finally:
                self.engine.model.load_state_dict(self.dense)
            self.computed += 1
            self.runs[key] = asdict(run)
            _write_json(self.runs_path, self.runs)
            self.log(
                f"  {pruner} {np.round(sparsities, 3).tolist()}: ppl {run.ppl:.3f} "
                f"(prune {prune_s:.1f} s, eval {run.eval_s:.1f} s)"
            )
        return Run(**self.runs[key])

    def _measure(self, prune_s: float) -> Run:
        start = time.perf_counter()
        results = [stream_perplexity(self.engine, c, self.args.seqlen) for c in self.chunks]
        sizes = np.array([r.windows for r in results], dtype=float)
        chunk = [r.mean_nll for r in results]
        mean = float(np.dot(sizes, chunk) / sizes.sum())
        return Run(mean, chunk, prune_s, time.perf_counter() - start)


def paired_se(a: Run, b: Run) -> float:
    """Standard error of the log-perplexity difference a - b from paired evaluation chunks."""
    diff = np.array(a.chunk_nll) - np.array(b.chunk_nll)
    return float(diff.std(ddof=1) / math.sqrt(diff.size))


def compare(a: Run, b: Run) -> str:
    """Relative perplexity change of a over b with its 2-SE range, and whether it is noise."""
    delta, se = a.mean_nll - b.mean_nll, paired_se(a, b)
    flag = " (noise)" if abs(delta) < NOISE_SE * se else ""
    return f"{math.expm1(delta):+.1%} ± {math.expm1(NOISE_SE * se):.1%}{flag}"


@contextlib.contextmanager
def ablated(engine: BlockModel, masks: dict[int, BlockMasks], coalition: int) -> Iterator[None]:
    """Swap in the probe-pruned weights of every block in ``coalition`` for the duration."""
    saved = []
    for b in range(engine.n_blocks):
        if (coalition >> b) & 1:
            for name, layer in linear_layers(engine.blocks[b]).items():
                saved.append((layer, layer.weight.data))
                layer.weight.data = layer.weight.data.masked_fill(masks[b][name], 0)
    try:
        yield
    finally:
        for layer, weight in saved:
            layer.weight.data = weight


@torch.no_grad()
def naive_nll(engine: BlockModel, ids: torch.Tensor, masks, coalition: int) -> float:
    """Mean NLL from a full forward of the ablated model: the evaluator without prefix sharing."""
    with ablated(engine, masks, coalition):
        hidden, kwargs = engine.embed(ids)
        hidden = engine.forward_blocks(hidden, kwargs)
        return float(engine.sequence_nll(hidden, ids).sum()) / (ids.shape[0] * (ids.shape[1] - 1))


def section_estimators(study: Study, emit) -> None:
    """Exact Shapley against SWSV and leave-one-out, read from the full coalition tables."""
    args, n = study.args, study.n_blocks
    exact = Exact(n)
    emit("## 1. Estimators against exact Shapley")
    emit("")
    for probe in args.exact_probes:
        table = study.table(probe, exact.coalitions())
        results = {v: study.estimate(exact, probe, v) for v in TRANSFORMS}
        gap = -table[0] + table[(1 << n) - 1]
        emit(
            f"Probe sparsity {probe} (Wanda probe masks). Efficiency check (neg_nll): sum of "
            f"exact values {results['neg_nll'].values.sum():.4f} = v(all dense) - v(all ablated) "
            f"{gap:.4f}."
        )
        emit("")
        emit(
            "\n".join(
                _header(
                    "estimator",
                    "distinct coalitions",
                    "trie block forwards",
                    "Spearman (neg_nll)",
                    "Spearman (neg_ppl)",
                )
            )
        )
        emit(_row("exact", 1 << n, trie_forwards(exact.coalitions(), n), "1", "1"))
        estimators = [(f"SWSV w={w}", SlidingWindow(n, w)) for w in args.widths]
        for label, est in [*estimators, ("LOO", LeaveOneOut(n))]:
            rhos = [
                spearman(study.estimate(est, probe, v).values, results[v].values)
                for v in TRANSFORMS
            ]
            emit(
                _row(
                    label,
                    len(est.coalitions()),
                    trie_forwards(est.coalitions(), n),
                    *(f"{r:.3f}" for r in rhos),
                )
            )
        emit("")
    probe = args.probe
    swsv = study.estimate(SlidingWindow(n, args.window), probe, args.value)
    loo = study.estimate(LeaveOneOut(n), probe, args.value)
    exact_values = (
        study.estimate(exact, probe, args.value).values
        if probe in args.exact_probes
        else np.full(n, np.nan)
    )
    emit(
        f"Per-block values at probe {probe} ({args.value}); allocations at target "
        f"{args.study_targets[0]} (SV-NUP and LOO lambda {args.lam}, OWL lambda {args.owl_lam}):"
    )
    emit("")
    emit(
        "\n".join(
            _header(
                "block",
                "params",
                "exact",
                f"SWSV w={args.window} ± se",
                "LOO",
                "OWL density",
                "s SV-NUP",
                "s LOO",
                "s OWL",
            )
        )
    )
    target = args.study_targets[0]
    alloc = {
        "svnup": allocate("svnup", swsv.values, study.params, target, **{"lambda": args.lam}),
        "loo": allocate("loo", loo.values, study.params, target, **{"lambda": args.lam}),
        "owl": allocate(
            "owl", study.outlier_density, study.params, target, **{"lambda": args.owl_lam}
        ),
    }
    for b in range(n):
        emit(
            _row(
                b,
                int(study.params[b]),
                f"{exact_values[b]:.4f}",
                f"{swsv.values[b]:.4f} ± {swsv.stderr[b]:.4f}".replace("± nan", "(one window)"),
                f"{loo.values[b]:.4f}",
                f"{study.outlier_density[b]:.4f}",
                *(f"{alloc[m][b]:.3f}" for m in ("svnup", "loo", "owl")),
            )
        )
    emit("")


def section_cost(study: Study, emit) -> None:
    """Prefix-sharing evaluator against one full forward per coalition."""
    args, n = study.args, study.n_blocks
    emit("## 2. Evaluator cost against a naive evaluator")
    emit("")
    evaluations = study.evaluations[args.probe]
    forwards = sum(e["block_forwards"] for e in evaluations)
    seconds = sum(e["seconds"] for e in evaluations)
    coalitions = sum(e["coalitions"] for e in evaluations)
    start = (n - args.window) // 2
    window = SlidingWindow(n, args.window).window_coalitions(start, start + args.window)
    masks = study.masks(args.probe)
    evaluator = CoalitionEvaluator(study.engine, study.shapley_ids, "prune", masks)
    trie_nll: dict[int, float] = {}
    trie = evaluator.evaluate(window, lambda m, s, t, _: trie_nll.__setitem__(m, s / t))
    begin = time.perf_counter()
    naive = {m: naive_nll(study.engine, study.shapley_ids, masks, m) for m in window}
    naive_s = time.perf_counter() - begin
    worst = max(abs(naive[m] - trie_nll[m]) for m in window)
    per_naive = naive_s / len(window)
    naive_full = coalitions * n
    emit(
        f"Evaluation set {args.shapley_nsamples} x {args.shapley_seqlen} tokens, probe "
        f"{args.probe}. Naive = embed, all {n} blocks and the head for every coalition. The "
        f"window row is measured in this run (SWSV window of blocks {start}-"
        f"{start + args.window - 1}, {len(window)} coalitions; max |naive - evaluator| mean NLL "
        f"{worst:.1e}); the exact-table naive time is that window's naive time per coalition "
        f"x {coalitions}."
    )
    emit("")
    emit(
        "\n".join(
            _header(
                "workload",
                "coalitions",
                "evaluator forwards",
                "naive forwards",
                "forward ratio",
                "evaluator s",
                "naive s",
                "time ratio",
            )
        )
    )
    emit(
        _row(
            f"SWSV window {start}-{start + args.window - 1}",
            len(window),
            trie.block_forwards,
            trie.naive_block_forwards,
            f"{trie.forward_ratio:.2f}",
            f"{trie.seconds:.1f}",
            f"{naive_s:.1f}",
            f"{naive_s / trie.seconds:.2f}",
        )
    )
    emit(
        _row(
            f"exact table ({len(evaluations)} evaluator run(s), cached ones included)",
            coalitions,
            forwards,
            naive_full,
            f"{naive_full / max(forwards, 1):.2f}",
            f"{seconds:.1f}",
            f"{per_naive * coalitions:.0f} (extrapolated)",
            f"{per_naive * coalitions / max(seconds, 1e-9):.2f}",
        )
    )
    emit("")


def importance(study: Study, method: str, probe: float, value: str) -> np.ndarray:
    n = study.n_blocks
    estimator = LeaveOneOut(n) if method == "loo" else SlidingWindow(n, study.args.window)
    study.table(probe, estimator.coalitions())
    return study.estimate(estimator, probe, value).values


def allocation(
    study: Study,
    method: str,
    target: float,
    lam: float | None = None,
    probe: float | None = None,
    value: str | None = None,
) -> np.ndarray:
    args = study.args
    if method == "uniform":
        return allocate("uniform", None, study.params, target)
    if method == "owl":
        lam = args.owl_lam if lam is None else lam
        return allocate("owl", study.outlier_density, study.params, target, **{"lambda": lam})
    scores = importance(study, method, args.probe if probe is None else probe, value or args.value)
    lam = args.lam if lam is None else lam
    return allocate(method, scores, study.params, target, **{"lambda": lam})


def section_perplexity(study: Study, emit) -> None:
    """Every allocation method at every target, with both pruners."""
    args = study.args
    dense = study.perplexity(np.zeros(study.n_blocks), "wanda")
    emit("## 3. WikiText-2 test perplexity by allocation")
    emit("")
    emit(
        f"Dense model on the same windows: {dense.ppl:.3f}. SV-NUP: SWSV w={args.window}, probe "
        f"{args.probe}, {args.value}, lambda {args.lam}; LOO: same probe, value and lambda; OWL: "
        f"M={args.owl_m:g}, lambda {args.owl_lam}. Best per column in bold. The last rows give "
        f"SV-NUP's perplexity change over the best of uniform/OWL/LOO with a 2-SE range from "
        f"{args.ppl_chunks} paired evaluation chunks; (noise) marks |change| < 2 SE."
    )
    emit("")
    emit("\n".join(_header("pruner", "allocation", *(f"{t:.0%}" for t in args.targets))))
    names = {"uniform": "uniform", "owl": "OWL", "loo": "LOO", "svnup": "SV-NUP"}
    for pruner in args.pruners:
        runs = {
            (m, t): study.perplexity(allocation(study, m, t), pruner)
            for t in args.targets
            for m in METHODS
        }
        for m in METHODS:
            cells = []
            for t in args.targets:
                best = min(runs[(x, t)].ppl for x in METHODS)
                ppl = runs[(m, t)].ppl
                cells.append(f"**{ppl:.2f}**" if ppl == best else f"{ppl:.2f}")
            emit(_row(pruner, names[m], *cells))
        cells = []
        for t in args.targets:
            base = min((runs[(x, t)] for x in METHODS[:-1]), key=lambda r: r.mean_nll)
            cells.append(compare(runs[("svnup", t)], base))
        emit(_row(pruner, "SV-NUP vs best baseline", *cells))
    emit("")


def section_study(study: Study, emit) -> None:
    """Probe sparsity x lambda x value transform, judged by final perplexity with Wanda."""
    args = study.args
    emit("## 4. Choosing the defaults (Wanda)")
    emit("")
    emit(
        f"SV-NUP with SWSV w={args.window}; every cell is a pruned model's WikiText-2 perplexity. "
        f"Baselines are swept over the same lambdas (LOO also over the probe sparsities, with "
        f"{args.value}; OWL's own {args.owl_lam:g} added). Noise: a configuration is tied with the "
        f"best when their paired difference is under {NOISE_SE:g} SE of the evaluation windows; "
        f"calibration noise is not included, and choosing on these windows favours the config "
        f"with the most variants tried."
    )
    emit("")
    for target in args.study_targets:
        runs: dict[tuple, Run] = {}
        for probe in args.study_probes:
            for value in TRANSFORMS:
                for lam in args.study_lams:
                    alloc = allocation(study, "svnup", target, lam, probe, value)
                    runs[("SV-NUP", probe, value, lam)] = study.perplexity(alloc, "wanda")
        for probe in args.study_probes:
            for lam in args.study_lams:
                alloc = allocation(study, "loo", target, lam, probe, args.value)
                runs[("LOO", probe, args.value, lam)] = study.perplexity(alloc, "wanda")
        for lam in sorted({*args.study_lams, args.owl_lam}):
            runs[("OWL", None, None, lam)] = study.perplexity(
                allocation(study, "owl", target, lam), "wanda"
            )
        runs[("uniform", None, None, 0.0)] = study.perplexity(
            allocation(study, "uniform", target), "wanda"
        )
        emit(f"### Target {target:.0%}")
        emit("")
        emit(f"Uniform {runs[('uniform', None, None, 0.0)].ppl:.2f}.")
        emit("")
        lams = sorted({k[3] for k in runs if k[0] != "uniform"})
        emit("\n".join(_header("allocation", "probe", "value", *(f"λ={x:g}" for x in lams))))
        rows: dict[tuple, dict[float, Run]] = {}
        for (method, probe, value, lam), run in runs.items():
            if method != "uniform":
                rows.setdefault((method, probe, value), {})[lam] = run
        for (method, probe, value), row in rows.items():
            emit(
                _row(
                    method,
                    probe or "-",
                    value or "-",
                    *(f"{row[x].ppl:.2f}" if x in row else "" for x in lams),
                )
            )
        emit("")
        best_key = min(runs, key=lambda k: runs[k].mean_nll)
        best = runs[best_key]
        ties = [
            k
            for k in runs
            if k != best_key
            and abs(runs[k].mean_nll - best.mean_nll) < NOISE_SE * paired_se(runs[k], best)
        ]
        emit(
            f"Best: {_label(best_key)} at {best.ppl:.2f}. Within noise of it: "
            f"{', '.join(_label(k) for k in ties) or 'none'}."
        )
        baselines = {k: r for k, r in runs.items() if k[0] != "SV-NUP"}
        base_key = min(baselines, key=lambda k: baselines[k].mean_nll)
        svnup_key = min((k for k in runs if k[0] == "SV-NUP"), key=lambda k: runs[k].mean_nll)
        emit(
            f"Best SV-NUP ({_label(svnup_key)}) vs best baseline ({_label(base_key)}): "
            f"{compare(runs[svnup_key], runs[base_key])}."
        )
        emit("")
        svnup_runs = {k: r for k, r in runs.items() if k[0] == "SV-NUP"}
        for factor, position in (("probe", 1), ("value", 2), ("lambda", 3)):
            levels = sorted({k[position] for k in svnup_runs})
            means = {
                x: np.mean([math.log(r.ppl) for k, r in svnup_runs.items() if k[position] == x])
                for x in levels
            }
            cells = ", ".join(f"{x}: {math.exp(means[x]):.2f}" for x in levels)
            emit(f"- {factor}, geometric-mean SV-NUP perplexity over the other factors: {cells}")
        emit("")


def _label(key: tuple) -> str:
    method, probe, value, lam = key
    if method in ("SV-NUP", "LOO"):
        return f"{method} probe {probe} {value} λ={lam:g}"
    return method if method == "uniform" else f"{method} λ={lam:g}"


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    began = time.perf_counter()
    lines: list[str] = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + lines) + "\n")

    log("loading model, calibration, dense statistics and evaluation windows")
    study = Study(args, log)
    header = [
        "# SV-NUP study: Shapley estimators, evaluator cost, allocation, defaults",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs; load "
        f"average at start {os.getloadavg()[0]:.1f}), {args.threads} torch thread(s)",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- model: {args.model.name} ({study.n_blocks} blocks, "
        f"{int(study.params.sum())} prunable weights)",
        f"- calibration: {args.nsamples} x {args.seqlen} tokens from {C4.name} (seed {args.seed}); "
        f"Shapley evaluation set: the first {args.shapley_nsamples} of them, first "
        f"{args.shapley_seqlen} tokens each; probe masks: Wanda from dense statistics",
        f"- evaluation: WikiText-2 test, {args.seqlen}-token windows, {study.eval_windows} evenly "
        f"spaced of {study.total_windows} (chosen to fit the time budget), in {args.ppl_chunks} "
        f"chunks for paired noise estimates",
        "",
    ]
    sections = (section_estimators, section_cost, section_perplexity, section_study)
    for section in sections:
        log(f"section {section.__name__}")
        section(study, emit)
        write()
    emit(
        f"Wall time of this invocation {time.perf_counter() - began:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.1f}. Pruned models measured in this invocation: {study.computed} "
        f"of {len(study.requested)}; the rest came from the cache (their times are in the log "
        f"of the invocation that measured them)."
    )
    write()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
