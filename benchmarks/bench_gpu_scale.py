"""The whole workflow on a LLaMA-2-7B shape on one GPU, against the scaling study's prediction.

Why: the scaling study (benchmarks/bench_scale.py, results/scale.md) fits each stage's cost on
the CPU and predicts the GPU time of the recommended settings from FLOPs at the coalition
throughput measured on an H200. This script checks that prediction in one command of at most
10 minutes: it writes a random checkpoint with LLaMA-2-7B's exact shape in bfloat16 and a local
WikiText-2 stand-in (nothing can be downloaded on the GPU machine, and ../shared may be absent),
runs the workflow from calibration to ppl.json with the recommended settings at a reduced
protocol (Wanda at 70%, 32 x 2,048 calibration tokens, 8 game sequences, the first 64 windows),
and reports per stage the seconds, peak GPU memory, host memory and disk, each stage beside
``svnup.costs``' prediction for the same jobs.

    PYTHONPATH=. python3 benchmarks/bench_gpu_scale.py --out $OUT/gpu-scale.md
    PYTHONPATH=. python benchmarks/bench_gpu_scale.py --blocks 2 --width 256 --dtype float32 \\
        --device cpu --nsamples 4 --seqlen 128 --eval-samples 2 --windows 2 --out smoke.md

The second line is the CPU smoke run at a tiny shape. The GPU machine has no snakemake: write its
wheels here with ``python benchmarks/device_wheels.py --out .whl``, carry ``.whl`` and begin the
device command with the install line that script prints. Everything is written under ``--work``
(default benchmarks/.cache/gpu-scale); a finished checkpoint there is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_scale  # noqa: E402
import shapes  # noqa: E402

MODEL = bench_scale.MODEL
TARGET = 0.7
STAGES = ("calibrate", "probe", "coalitions", "prune", "evaluate")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(set(shapes.SHAPES) - set(shapes.PLAN_ONLY)))
    p.add_argument("--blocks", type=int, default=None, help="fewer blocks (a smoke run)")
    p.add_argument("--width", type=int, default=None, help="a narrower width (a smoke run)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-samples", type=int, default=8, help="sequences of the games")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cores", type=int, default=4, help="snakemake --cores")
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "gpu-scale")
    p.add_argument(
        "--deadline",
        type=float,
        default=540,
        help="seconds from the start after which the workflow is stopped and what finished is "
        "reported (the device machine allows 600 a command)",
    )
    p.add_argument("--out", type=Path, required=True, help="the markdown report")
    args = p.parse_args(argv)
    args.shape = args.shape or "llama-2-7b"
    return args


def config(args: argparse.Namespace) -> dict:
    """The recommended settings (bench_scale.point_config) on the GPU, Wanda only."""
    point = bench_scale.Point(
        "gpu",
        base=args.shape,
        blocks=args.blocks,
        width=args.width,
        seqlen=args.seqlen,
        nsamples=args.nsamples,
        eval_samples=args.eval_samples,
        windows=args.windows,
        pruners=("wanda",),
        dtype=args.dtype,
    )
    settings = bench_scale.point_config(point)
    settings["models"][MODEL].update(device=args.device, batch_size=args.batch_size)
    settings["save_model"] = settings["keep_probes"] = False  # the defaults: the disk a user sees
    return settings


class Sampler:
    """Samples, every ``interval`` seconds, the disk under ``folder`` and the GPU's used memory
    (nvidia-smi, whole device), keeping the time of each sample."""

    def __init__(self, folder: Path, interval: float = 1.0) -> None:
        self.folder, self.interval = folder, interval
        self.samples: list[tuple[float, int, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_mib(self) -> float | None:
        if not shutil.which("nvidia-smi"):
            return None
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
        return float(out.split()[0]) if out.strip() else None

    def _run(self) -> None:
        while not self._stop.is_set():
            disk = bench_scale._size(self.folder) if self.folder.exists() else 0
            self.samples.append((time.time(), disk, self._gpu_mib()))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prepare(args: argparse.Namespace) -> tuple[Path, Path, float]:
    """The checkpoint and the stand-in (reused when finished), and the seconds they took."""
    start = time.perf_counter()
    shape = shapes.scaled(args.shape, args.blocks, args.width)
    name = shapes.variant_name(args.shape, args.blocks, args.width, None)
    model = shapes.write_checkpoint(
        shape, args.work / "shapes" / f"{name}-{args.dtype}", args.dtype, device=args.device
    )
    data = shapes.write_standin(args.work / "data")
    return model, data, time.perf_counter() - start


def run_until(command: list[str], cwd: Path, env: dict, log: Path, seconds: float) -> tuple:
    """Run ``command`` with its output in ``log`` for at most ``seconds``; (exit code, whether
    it was stopped at the deadline). A stopped workflow's finished jobs are still reported."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=max(seconds, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            return process.wait(), True


def run_workflow(args: argparse.Namespace, model: Path, data: Path) -> tuple[dict, list, float]:
    """Snakemake from an empty results/ folder; the jobs' records, the samples, the seconds."""
    workdir = args.work / "run"
    for folder in (workdir / "results", workdir / ".cache", workdir / ".snakemake"):
        shutil.rmtree(folder, ignore_errors=True)
    (workdir / "models").mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    bench_scale._link(workdir / "models" / MODEL, model)
    bench_scale._link(workdir / "data" / data.name, data)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config(args), sort_keys=False))
    targets = [f"results/{MODEL}/dense/ppl.json", f"results/{MODEL}/s{TARGET}/ppl.json"]
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(args.cores),
        *targets,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--scheduler",  # the ILP scheduler needs pulp, which device_wheels.py does not carry
        "greedy",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["SVNUP_CACHE"] = str(workdir / ".cache" / "tokens")
    start = time.perf_counter()
    left = args.deadline - (time.monotonic() - args.started)
    with Sampler(workdir / "results") as sampler:
        returncode, stopped = run_until(command, workdir, env, workdir / "snakemake.log", left)
    seconds = time.perf_counter() - start
    if returncode != 0 and not stopped:
        tail = (workdir / "snakemake.log").read_text()[-3000:]
        raise SystemExit(f"snakemake failed (exit {returncode}):\n{tail}")
    jobs = bench_scale.jobs(workdir / "results" / MODEL)
    record = {"jobs": jobs, "command": shlex.join(command[3:]), "stopped": stopped}
    return record, sampler.samples, seconds


def predictions(args: argparse.Namespace, shape: dict, jobs: list[dict]) -> list[dict]:
    """Each measured model job beside ``svnup.costs``' GPU seconds for the same job."""
    from svnup import costs

    cost_shape = costs.Shape.from_config(shape)
    dtype_bytes = 4 if args.dtype == "float32" else 2
    rows = []
    for job in jobs:
        rule, detail = job["rule"], job["detail"]
        if rule not in STAGES:
            continue
        if rule == "coalitions":
            planned = costs.Job(
                "coalitions",
                args.eval_samples,
                args.seqlen,
                forwards=detail["block_forwards"],
                coalitions=detail["coalitions"],
            )
        elif rule == "evaluate":
            planned = costs.Job("evaluate", detail["windows"], args.seqlen)
        else:
            pruner = detail.get("pruner") if rule in ("probe", "prune") else None
            planned = costs.Job(rule, args.nsamples, args.seqlen, pruner)
        predicted = costs.gpu_seconds(planned, cost_shape, dtype_bytes)
        rows.append(
            {**job, "predicted_s": predicted, "flops": costs.work(planned, cost_shape).flops}
        )
    return rows


def _environment(args: argparse.Namespace) -> dict:
    import torch

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    usage = shutil.disk_usage(args.work if args.work.exists() else HERE)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "host_memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "disk_free_gib": usage.free / 2**30,
        "shared": (REPO.parent / "shared").is_dir(),
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def report(
    args, environment, shape, model_bytes, prepare_s, run_s, rows, samples, plan, stopped
) -> str:
    peak_disk = max((d for _, d, _ in samples), default=0)
    peak_gpu = max((g for _, _, g in samples if g is not None), default=None)
    lines = [
        f"# The workflow on a {args.shape} shape on one GPU, against the CPU study's prediction",
        "",
        f"- command: `{environment['command']}`",
        f"- date: {environment['date']}; device: {environment['device']}; torch "
        f"{environment['torch']}; {environment['cores']} cores, "
        f"{environment['host_memory_gib']:.0f} GiB host memory, "
        f"{environment['disk_free_gib']:.0f} GiB disk free; ../shared present: "
        f"{environment['shared']}",
        f"- model: {shape}, {args.dtype}, random weights (benchmarks/shapes.py), "
        f"{model_bytes / 2**30:.2f} GiB on disk",
        f"- settings: shapley loo on halves, svnup-fit levels 0.6/0.7/0.8, probe_pruner match, "
        f"Wanda at {TARGET:.0%}; {args.nsamples} x {args.seqlen} calibration tokens, "
        f"{args.eval_samples} game sequences, the first {args.windows} windows of the "
        "WikiText-2 stand-in",
        f"- checkpoint and stand-in: {prepare_s:.0f} s; workflow: {run_s:.0f} s wall"
        + (
            " (stopped at the deadline: the stages missing below did not finish)" if stopped else ""
        ),
        f"- the planner's line: {plan or '(none: not a cuda model)'}",
        f"- peak disk of results/: {peak_disk / 2**30:.2f} GiB "
        f"({peak_disk / model_bytes:.2f}x the model); peak GPU memory in use (nvidia-smi): "
        + ("-" if peak_gpu is None else f"{peak_gpu / 1024:.1f} GiB"),
        "",
        "| stage | job | seconds | predicted | ratio | CPU s | max RSS (GiB) | peak GPU (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        gpu = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.1f}"
        what = ", ".join(f"{k} {v}" for k, v in row["detail"].items() if k != "store")
        lines.append(
            f"| {row['rule']} | {what} | {row['s']:.1f} | {row['predicted_s']:.1f} | "
            f"{row['s'] / row['predicted_s']:.2f} | {row['cpu_time']:.0f} | "
            f"{row['max_rss_mb'] / 1024:.2f} | {gpu} |"
        )
    by_stage = {}
    for row in rows:
        seconds, predicted = by_stage.get(row["rule"], (0.0, 0.0))
        by_stage[row["rule"]] = (seconds + row["s"], predicted + row["predicted_s"])
    total = [sum(v[0] for v in by_stage.values()), sum(v[1] for v in by_stage.values())]
    lines += ["", "| stage | seconds | predicted |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v[0]:.0f} | {v[1]:.0f} |" for k, v in by_stage.items()]
    lines += [f"| all model jobs | {total[0]:.0f} | {total[1]:.0f} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.started = time.monotonic()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    environment = _environment(args)
    print(f"../shared present: {environment['shared']}", flush=True)
    model, data, prepare_s = prepare(args)
    print(f"checkpoint {model} and stand-in {data}: {prepare_s:.0f} s", flush=True)
    record, samples, run_s = run_workflow(args, model, data)
    log = (args.work / "run" / "snakemake.log").read_text()
    plan = next((line for line in log.splitlines() if "predicted GPU time" in line), None)
    shape = shapes.scaled(args.shape, args.blocks, args.width)
    rows = predictions(args, shape, record["jobs"])
    model_bytes = bench_scale._size(model)
    text = report(
        args,
        environment,
        shape,
        model_bytes,
        prepare_s,
        run_s,
        rows,
        samples,
        plan,
        record["stopped"],
    )
    args.out.write_text(text)
    raw = {
        "environment": environment,
        "shape": shape,
        "model_bytes": model_bytes,
        "prepare_seconds": prepare_s,
        "workflow_seconds": run_s,
        "rows": rows,
        "samples": samples,
        "plan": plan,
        **record,
    }
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
