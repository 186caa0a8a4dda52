"""Fits and predictions of the scaling study (benchmarks/bench_scale.py report), as markdown.

Each stage's CPU seconds are fitted to ``svnup.costs``' work model with non-negative
coefficients: a fixed cost per job (starting Python, torch and the model), the model's bytes
(loading it), its matrix FLOPs and, for SparseGPT, its sequential column steps. The FLOP rate
of each stage relative to coalition evaluation's carries the study to the GPU, where coalition
evaluation's rate was measured (benchmarks/results/gpu-coalitions.md); memory and disk are
predicted from the shapes with the formulas below and checked against the ladder.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import shapes

from svnup import costs

FULL = {"nsamples": 128, "seqlen": 2048, "eval_samples": 16, "levels": (0.6, 0.7, 0.8)}
PREDICTED = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "llama-2-13b", "llama-2-70b")
WIKITEXT2_WINDOWS = costs.HUB_EVAL_TOKENS["wikitext2"] // FULL["seqlen"]
KINDS = (
    "calibrate",
    "probe/sparsegpt",
    "probe/wanda",
    "coalitions",
    "prune/sparsegpt",
    "prune/wanda",
    "evaluate",
)


def cost_shape(shape: dict) -> costs.Shape:
    return costs.Shape.from_config(shape)


def job_of(record: dict, job: dict) -> costs.Job | None:
    """The ``svnup.costs`` job of a measured model job (None for the bookkeeping rules)."""
    point, detail = record["point"], job["detail"]
    rule = job["rule"]
    if rule == "calibrate":
        return costs.Job("calibrate", point["nsamples"], point["seqlen"])
    if rule in ("probe", "prune"):
        return costs.Job(rule, point["nsamples"], point["seqlen"], detail["pruner"])
    if rule == "coalitions":
        return costs.Job(
            "coalitions",
            point["eval_samples"],
            point["seqlen"],
            forwards=detail["block_forwards"],
            coalitions=detail["coalitions"],
        )
    if rule == "evaluate":
        return costs.Job("evaluate", detail["windows"], point["seqlen"])
    return None


def samples(records: list[dict]) -> dict[str, list[dict]]:
    """Every model job of the ladder, by kind, with its work and what it took."""
    found = defaultdict(list)
    for record in records:
        shape = cost_shape(record["shape"])
        for job in record["jobs"]:
            planned = job_of(record, job)
            if planned is None:
                continue
            work = costs.work(planned, shape)
            found[planned.kind].append(
                {
                    "point": record["point"]["id"],
                    "flops": work.flops,
                    "steps": work.steps,
                    "forwards": work.forwards,
                    "bytes": record["model_bytes"],
                    "cpu": job["cpu_time"],
                    "wall": job["s"],
                    "rss_mb": job["max_rss_mb"],
                }
            )
    return found


def nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (the best of the non-negative solutions on
    each subset of the columns: there are at most four)."""
    best, best_error = np.zeros(x.shape[1]), float(np.sum(y**2))
    columns = range(x.shape[1])
    for size in range(1, x.shape[1] + 1):
        for subset in itertools.combinations(columns, size):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if np.any(coef < 0):
                continue
            error = float(np.sum((x[:, subset] @ coef - y) ** 2))
            if error < best_error:
                best, best_error = np.zeros(x.shape[1]), error
                best[list(subset)] = coef
    return best


def fit(rows: list[dict], sparsegpt: bool) -> dict:
    """CPU seconds = fixed + bytes / bandwidth + FLOPs / rate (+ steps x step seconds)."""
    names = ["fixed", "per_byte", "per_flop"] + (["per_step"] if sparsegpt else [])
    x = np.array(
        [[1.0, r["bytes"], r["flops"]] + ([r["steps"]] if sparsegpt else []) for r in rows]
    )
    y = np.array([r["cpu"] for r in rows])
    coef = nonnegative_fit(x, y)
    fitted = x @ coef
    total = float(np.sum((y - y.mean()) ** 2)) or 1.0
    flop_share = x[:, 2] * coef[2] / np.maximum(fitted, 1e-9)
    return {
        **dict(zip(names, coef.tolist(), strict=True)),
        "r2": 1 - float(np.sum((y - fitted) ** 2)) / total,
        "jobs": len(rows),
        "max_relative_error": float(np.max(np.abs(fitted - y) / y)),
        "flop_share_largest": float(flop_share[int(np.argmax(x[:, 2]))]),
    }


def fits(found: dict[str, list[dict]]) -> dict[str, dict]:
    return {kind: fit(found[kind], kind.endswith("sparsegpt")) for kind in KINDS if found[kind]}


def host_fits(found: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """Peak resident memory = baseline + share x model bytes, per stage (non-negative)."""
    result = {}
    for kind in KINDS:
        rows = found.get(kind)
        if rows:
            x = np.array([[1.0, r["bytes"]] for r in rows])
            y = np.array([r["rss_mb"] * 2**20 for r in rows])
            result[kind] = nonnegative_fit(x, y)
    return result


def host_table(fitted: dict[str, np.ndarray]) -> list[str]:
    lines = [
        "| stage | baseline (GB) | x model bytes | LLaMA-2-7B (13.5 GB) | LLaMA-2-70B (138 GB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, (base, share) in fitted.items():
        at = [
            base + share * shapes.weight_bytes(shapes.SHAPES[n], 2)["total"]
            for n in ("llama-2-7b", "llama-2-70b")
        ]
        lines.append(
            f"| {kind} | {base / 1e9:.2f} | {share:.2f} | {at[0] / 1e9:.1f} GB | "
            f"{at[1] / 1e9:.0f} GB |"
        )
    return lines


def relative_throughput(fitted: dict[str, dict]) -> dict[str, float]:
    """Each stage's FLOP rate on the CPU over coalition evaluation's."""
    base = fitted["coalitions"]["per_flop"]
    return {k: base / f["per_flop"] for k, f in fitted.items() if f["per_flop"] > 0}


def full_jobs(shape: costs.Shape) -> list[costs.Job]:
    """The full protocol: 128 x 2,048 calibration tokens, leave-one-out games on halves at the
    three levels over 16 sequences, SparseGPT, WikiText-2 (166 windows) and C4 (256 windows),
    dense and pruned."""
    n, s = FULL["nsamples"], FULL["seqlen"]
    bits = [3 << (2 * b) for b in range(shape.blocks)]
    loo = [0] + [1 << i for i in range(2 * shape.blocks)]
    forwards = costs.trie_forwards(loo, bits)
    jobs = [costs.Job("calibrate", n, s)]
    jobs += [costs.Job("probe", n, s, "sparsegpt") for _ in FULL["levels"]]
    jobs += [
        costs.Job("coalitions", FULL["eval_samples"], s, forwards=forwards, coalitions=len(loo))
        for _ in FULL["levels"]
    ]
    jobs += [costs.Job("prune", n, s, "sparsegpt")]
    jobs += [costs.Job("evaluate", w, s) for w in (WIKITEXT2_WINDOWS, costs.C4_WINDOWS) * 2]
    return jobs


def gpu_memory_gib(shape: costs.Shape, job: costs.Job, batch: int = 8) -> float:
    """Peak GPU memory of a job (bf16): resident weights (or one block's and the head's when
    offloaded), the hidden states a stage keeps (an evaluation pass's, ``costs.eval_pass_windows``),
    one block's float32 Hessians and SparseGPT's working copies, three float32 logit chunks of
    ``costs.working_bytes`` (the logits, their log-softmax, the loss), a micro-batch's MLP
    activations."""
    weights = shape.weights * 2
    block = shape.block_weights * 2
    resident = block + 2 * shape.vocab * shape.hidden * 2 if costs.offloaded(shape) else weights
    state = job.seqlen * shape.hidden * 2
    copies = {"calibrate": 2, "probe": 2, "prune": 2, "coalitions": 4, "evaluate": 2}[job.stage]
    sequences = job.sequences
    if job.stage == "evaluate":
        sequences = min(
            sequences,
            costs.eval_pass_windows(weights, job.seqlen, shape.hidden, 2, batch, "cuda"),
        )
    hidden = copies * sequences * state
    extra = 0.0
    if job.pruner == "sparsegpt":
        layers = shape.layers().values()
        hessians = sum(n * n * 4 for _, n in layers)
        widest = max(rows * n for rows, n in layers)
        extra = hessians + widest * 4 + 2 * max(n for _, n in layers) ** 2 * 4
    chunk = costs.working_bytes(weights, device_type="cuda")
    logits = 3 * chunk if job.stage in ("coalitions", "evaluate") else 0
    activations = 3 * batch * job.seqlen * shape.intermediate * 2
    return (resident + hidden + extra + logits + activations) / 2**30


def disk_bytes(shape: costs.Shape, target: float = 0.7, dtype_bytes: int = 2) -> dict[str, float]:
    """Disk of the full protocol's intermediates (formula of scale.md): what is kept, and the
    pruned layers a run at ``target`` keeps until it is evaluated (save_model off)."""
    n, s = FULL["nsamples"], FULL["seqlen"]
    norms = shape.blocks * sum(n_in * 4 for _, n_in in shape.layers().values())
    probes = [costs.probe_bytes(shape, level, "sparsegpt", dtype_bytes) for level in FULL["levels"]]
    pruned = costs.probe_bytes(shape, target, "sparsegpt", dtype_bytes)
    return {
        "model": shape.weights * dtype_bytes,
        "calibration": n * s * 8 + norms,
        "probe masks": sum(p["masks"] for p in probes),
        "probe values": sum(p["values"] for p in probes),
        "pruned layers (temporary)": pruned["masks"] + pruned["values"],
    }


def _fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def ladder_table(records: list[dict]) -> list[str]:
    lines = [
        "| point | hidden | MLP | blocks | heads/KV | vocab | tokens (calib, game, eval) | "
        "dtype | model | jobs | CPU s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        p, s = r["point"], r["shape"]
        cpu = sum(j["cpu_time"] for j in r["jobs"])
        tokens = (
            f"{p['nsamples']}x{p['seqlen']}, {p['eval_samples']}x{p['seqlen']}, "
            f"{p['windows']}x{p['seqlen']}"
        )
        lines.append(
            f"| {p['id']} | {s['hidden_size']} | {s['intermediate_size']} | "
            f"{s['num_hidden_layers']} | {s['num_attention_heads']}/{s['num_key_value_heads']} | "
            f"{s['vocab_size']} | {tokens} | {p['dtype']} | {_fmt_bytes(r['model_bytes'])} | "
            f"{len(r['jobs'])} | {cpu:.0f} | {r['wall_seconds']:.0f} |"
        )
    return lines


def stage_table(records: list[dict]) -> list[str]:
    lines = [
        "| point | stage | jobs | block forwards | GFLOP | CPU s | wall s | max RSS / model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        shape = cost_shape(r["shape"])
        by_kind = defaultdict(list)
        for job in r["jobs"]:
            planned = job_of(r, job)
            if planned is not None:
                by_kind[planned.kind].append((job, costs.work(planned, shape)))
        for kind in KINDS:
            rows = by_kind.get(kind)
            if not rows:
                continue
            rss = max(j["max_rss_mb"] for j, _ in rows) * 2**20 / r["model_bytes"]
            lines.append(
                f"| {r['point']['id']} | {kind} | {len(rows)} | "
                f"{sum(w.forwards for _, w in rows)} | {sum(w.flops for _, w in rows) / 1e9:.1f} | "
                f"{sum(j['cpu_time'] for j, _ in rows):.1f} | {sum(j['s'] for j, _ in rows):.0f} | "
                f"{rss:.2f} |"
            )
    return lines


def disk_table(records: list[dict]) -> list[str]:
    lines = [
        "| point | model | calibration | probes (measured) | probes (formula) | coalitions | "
        "checkpoint | intermediates / model | with the checkpoint |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        d, shape = r["disk"], cost_shape(r["shape"])
        dtype_bytes = 4 if r["point"]["dtype"] == "float32" else 2
        measured = sum(p["bytes"] for p in d["probes"] if p["pruner"] == "sparsegpt")
        formula = sum(
            sum(costs.probe_bytes(shape, p["level"], "sparsegpt", dtype_bytes).values())
            for p in d["probes"]
            if p["pruner"] == "sparsegpt"
        )
        kept = d["calibration"] + measured + d["coalitions"] + d["scores"] + d["budgets"]
        checkpoint = max(d["checkpoints"], default=0)
        lines.append(
            f"| {r['point']['id']} | {_fmt_bytes(r['model_bytes'])} | "
            f"{_fmt_bytes(d['calibration'])} | {_fmt_bytes(measured)} | {_fmt_bytes(formula)} | "
            f"{_fmt_bytes(d['coalitions'])} | {_fmt_bytes(checkpoint)} | "
            f"{kept / r['model_bytes']:.2f} | {(kept + checkpoint) / r['model_bytes']:.2f} |"
        )
    return lines


def fit_table(fitted: dict[str, dict], relative: dict[str, float]) -> list[str]:
    lines = [
        "| stage | jobs | fixed s | load MB/s | GFLOP/s | us per column step | relative to "
        "coalitions | R^2 | max rel. error | FLOP share (largest job) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, f in fitted.items():
        load = "-" if not f["per_byte"] else f"{1 / f['per_byte'] / 1e6:.0f}"
        rate = "-" if not f["per_flop"] else f"{1 / f['per_flop'] / 1e9:.1f}"
        step = f"{f['per_step'] * 1e6:.0f}" if f.get("per_step") else "-"
        lines.append(
            f"| {kind} | {f['jobs']} | {f['fixed']:.1f} | {load} | {rate} | {step} | "
            f"{relative.get(kind, float('nan')):.2f} | {f['r2']:.3f} | "
            f"{f['max_relative_error']:.0%} | {f['flop_share_largest']:.0%} |"
        )
    return lines


def prediction_tables(relative: dict[str, float]) -> list[str]:
    lines = [
        "| model | weights (bf16) | stage | jobs | PFLOP | block forwards | GPU min | "
        "peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    totals = []
    for name in PREDICTED:
        shape = cost_shape(shapes.SHAPES[name])
        jobs = full_jobs(shape)
        by_stage = defaultdict(list)
        for job in jobs:
            by_stage[job.stage].append(job)
        minutes_total = 0.0
        for stage, members in by_stage.items():
            work = [costs.work(j, shape) for j in members]
            minutes = sum(costs.gpu_seconds(j, shape) for j in members) / 60
            minutes_total += minutes
            memory = max(gpu_memory_gib(shape, j) for j in members)
            lines.append(
                f"| {name} | {shape.weights * 2 / 1e9:.1f} GB | {stage} | {len(members)} | "
                f"{sum(w.flops for w in work) / 1e15:.2f} | {sum(w.forwards for w in work)} | "
                f"{minutes:.1f} | {memory:.0f} |"
            )
        flops = sum(costs.work(j, shape).flops for j in jobs)
        totals.append((name, shape, minutes_total, flops))
    lines += [
        "",
        "| model | GPU min, all stages | of which matrix FLOPs at the stage rates | "
        "disk: intermediates / model | peak at 50 / 60 / 70 / 80% (probes dropped, the default) | "
        "peak at 50 / 60 / 70 / 80% with keep_probes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, shape, minutes, _ in totals:
        jobs = full_jobs(shape)
        flop_minutes = (
            sum(
                costs.work(j, shape).flops
                / (costs.GPU_COALITION_FLOPS * costs.RELATIVE_THROUGHPUT[j.kind])
                for j in jobs
            )
            / 60
        )
        disk = disk_bytes(shape)
        kept = disk["calibration"] + disk["probe masks"] + disk["probe values"]
        targets = (0.5, 0.6, 0.7, 0.8)
        pruned = [disk_bytes(shape, t)["pruned layers (temporary)"] for t in targets]
        # probes dropped: they are gone before the first prune starts (the games come first)
        dropped = " / ".join(
            f"{max(kept, disk['calibration'] + p) / disk['model']:.2f}" for p in pruned
        )
        kept_all = " / ".join(f"{(kept + p) / disk['model']:.2f}" for p in pruned)
        lines.append(
            f"| {name} | {minutes:.1f} | {flop_minutes:.1f} | {kept / disk['model']:.2f} | "
            f"{dropped} | {kept_all} |"
        )
    return lines


def constants_block(relative: dict[str, float]) -> list[str]:
    lines = ["```python", "RELATIVE_THROUGHPUT = {"]
    for kind in costs.RELATIVE_THROUGHPUT:
        value = relative.get(kind, relative.get(kind.split("/")[0] + "/wanda", 1.0))
        lines.append(f'    "{kind}": {value:.3g},')
    return [*lines, "}", "```"]


def report(records: list[dict], machine: str) -> str:
    found = samples(records)
    fitted = fits(found)
    relative = relative_throughput(fitted)
    return "\n".join(
        [
            *ladder_table(records),
            "",
            *stage_table(records),
            "",
            *disk_table(records),
            "",
            *fit_table(fitted, relative),
            "",
            *host_table(host_fits(found)),
            "",
            *constants_block(relative),
            "",
            *prediction_tables(relative),
            "",
            f"(machine: {machine})",
        ]
    )
