"""What a run costs: each stage's work from the model's shape, and the GPU time of a plan.

Every model stage is a count of matrix FLOPs (block forwards, output heads, SparseGPT's Hessians
and updates) and, for SparseGPT, of sequential column steps. The scaling study
(benchmarks/bench_scale.py, benchmarks/results/scale.md) ran the recommended pipeline through the
workflow on a ladder of real-model shapes on the CPU and fitted each stage's cost to this model
with one throughput per stage; a stage's GPU time is its FLOPs at the coalition evaluation's
throughput on an H200 (benchmarks/results/gpu-coalitions.md) scaled by how fast that stage ran
relative to coalition evaluation on the CPU, plus its column steps and its share of loading the
model. Nothing here imports torch: the workflow prints a run's predicted GPU time while it plans.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from svnup.registry import PRUNERS

# Coalition evaluation of a LLaMA-7B shape in bfloat16 on one H200 (benchmarks/results/
# gpu-coalitions.md): block forwards and output heads at 477 TFLOP/s, 65% of the measured peak.
GPU_COALITION_FLOPS = 477.1e12
# Each stage's FLOP rate relative to coalition evaluation's, fitted on the CPU (scale.md, "Fits";
# 1 where a stage's fit has no FLOP term: a Wanda or magnitude probe is a sort, not matrix work).
RELATIVE_THROUGHPUT = {
    "calibrate": 1.62,
    "probe/sparsegpt": 1.07,
    "probe/wanda": 1.0,
    "probe/magnitude": 1.0,
    "coalitions": 1.0,
    "prune/sparsegpt": 1.06,
    "prune/wanda": 0.868,
    "prune/magnitude": 0.868,
    "evaluate": 1.0,
}
# Assumptions for the GPU until its run of benchmarks/bench_gpu_scale.py measures them: one
# SparseGPT column step (a few small kernels) in seconds, how fast a job reads the checkpoint
# and moves it to the GPU, what starting a job costs (Python, torch, CUDA), and how fast an
# offloaded block moves from the host to the GPU for each block forward.
GPU_STEP_SECONDS = 40e-6
GPU_LOAD_BYTES_PER_SECOND = 2e9
GPU_JOB_SECONDS = 15.0
GPU_OFFLOAD_BYTES_PER_SECOND = 12e9
# The H200's memory; svnup.models.BlockModel offloads the weights above 70% of the free memory.
GPU_MEMORY_BYTES = 141e9
OFFLOAD_FRACTION = 0.7
# Tokens of the hub evaluation sets as svnup cuts them: WikiText-2 test (rows joined with two
# newlines) is about 341K tokens in the LLaMA-2 tokenizer (166 windows of 2,048), C4 is cut to
# 256 windows whatever the tokenizer; other text is counted at 4 bytes a token.
HUB_EVAL_TOKENS = {"wikitext2": 341_469, "ptb": 112_000}
C4_WINDOWS = 256
BYTES_PER_TOKEN = 4

# A working buffer that grows with the tokens scored (a chunk of float32 logits, an evaluation
# pass's hidden states) takes at most WORKING_SHARE of the weights' bytes (five shares for a
# pass), and at least WORKING_MIN_BYTES, so a stage's memory is the model's plus a few percent
# at any vocabulary, sequence length and evaluation set (benchmarks/results/scale.md). On a GPU
# the floor is GPU_WORKING_MIN_BYTES: a small model's 1% would cut its work into kernels too
# small to run at speed (smollm2-135m's logits 85 positions at a time: about 5,400 chunks a
# generation of EvoPress at the reference's setting, by arithmetic), and 256 MiB is a fraction
# of a percent of a GPU that runs LLMs.
WORKING_SHARE = 0.01
WORKING_MIN_BYTES = 16 << 20
GPU_WORKING_MIN_BYTES = 256 << 20
PASS_SHARES = 5


def working_bytes(weight_bytes: float, shares: int = 1, device_type: str = "cpu") -> int:
    """Bytes a working buffer of ``shares`` working shares of the weights may take on a device
    of ``device_type`` (``torch.device.type``)."""
    floor = GPU_WORKING_MIN_BYTES if device_type == "cuda" else WORKING_MIN_BYTES
    return max(floor, int(shares * WORKING_SHARE * weight_bytes))


def eval_pass_windows(
    weight_bytes: float,
    seqlen: int,
    hidden: int,
    dtype_bytes: int,
    batch: int,
    device_type: str = "cpu",
) -> int:
    """Evaluation windows whose hidden states (a block's input and output) fit PASS_SHARES
    working shares, in whole micro-batches of ``batch`` (at least one)."""
    per_window = 2 * seqlen * hidden * dtype_bytes
    budget = working_bytes(weight_bytes, PASS_SHARES, device_type)
    return max(1, budget // (per_window * batch)) * batch


@dataclass(frozen=True)
class Shape:
    """What the cost of a decoder-only model depends on, from its config.json."""

    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config: Mapping) -> Shape:
        """From a config.json (a multimodal model's text config where it has one)."""
        config = config.get("text_config") or config
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return cls(
            hidden=hidden,
            intermediate=int(config.get("intermediate_size") or config.get("ffn_dim")),
            blocks=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def layers(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer of a block (LLaMA's layout)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, mlp = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (mlp, h),
            "mlp.up_proj": (mlp, h),
            "mlp.down_proj": (h, mlp),
        }

    @property
    def block_weights(self) -> int:
        return sum(o * i for o, i in self.layers().values())

    @property
    def weights(self) -> int:
        """Every weight but the norms: the blocks' linear layers, embeddings and head."""
        return self.blocks * self.block_weights + self.vocab * self.hidden * (1 if self.tied else 2)

    def block_flops(self, sequences: int, seqlen: int) -> float:
        """One block forward: its linear layers, and causal attention (QK^T and AV over half the
        positions), each multiply-add two FLOPs."""
        tokens = sequences * seqlen
        attention = 2.0 * tokens * seqlen * self.heads * self.head_dim
        return 2.0 * tokens * self.block_weights + attention

    def head_flops(self, sequences: int, seqlen: int) -> float:
        """The output head on every predicted position."""
        return 2.0 * sequences * (seqlen - 1) * self.hidden * self.vocab

    def sparsegpt_flops(self, sequences: int, seqlen: int) -> float:
        """SparseGPT on one block: each layer's Hessian (2 T n^2), its factorisations (n^3) and the
        lazy updates of the weights (rows n^2)."""
        tokens = sequences * seqlen
        return sum(2.0 * tokens * n * n + n**3 + rows * n * n for rows, n in self.layers().values())

    def sparsegpt_steps(self) -> int:
        """SparseGPT's sequential column steps on one block."""
        return sum(n for _, n in self.layers().values())

    def mask_flops(self) -> float:
        """A Wanda or magnitude mask of one block: scores and a sort of each row."""
        return sum(rows * n * math.log2(n) for rows, n in self.layers().values())


@dataclass(frozen=True)
class Job:
    """One model job of a plan: its stage, pruner, the sequences its forwards run on, and for a
    coalition job its block forwards and coalitions."""

    stage: str
    sequences: int
    seqlen: int
    pruner: str | None = None
    forwards: int = 0
    coalitions: int = 0

    @property
    def kind(self) -> str:
        """The stage, with the pruner where the pruner changes the work."""
        return f"{self.stage}/{self.pruner}" if self.stage in ("probe", "prune") else self.stage


@dataclass(frozen=True)
class Work:
    flops: float
    steps: int
    forwards: int


def work(job: Job, shape: Shape, dtype_bytes: int = 2) -> Work:
    """The matrix FLOPs, SparseGPT column steps and block forwards of ``job`` (an evaluation's
    block forwards count its passes, which a bfloat16 model at batch size 8 makes)."""
    n, s, blocks = job.sequences, job.seqlen, shape.blocks
    forward = shape.block_flops(n, s)
    sparsegpt = job.pruner == "sparsegpt"
    if job.stage == "calibrate":
        return Work(blocks * forward, 0, blocks)
    if job.stage == "probe":
        if sparsegpt:
            per_block = forward + shape.sparsegpt_flops(n, s)
            return Work(blocks * per_block, blocks * shape.sparsegpt_steps(), blocks)
        return Work(blocks * shape.mask_flops(), 0, 0)
    if job.stage == "coalitions":
        flops = job.forwards * forward + job.coalitions * shape.head_flops(n, s)
        return Work(flops, 0, job.forwards)
    if job.stage == "prune":  # a statistics pass and an output pass over every block
        extra = shape.sparsegpt_flops(n, s) if sparsegpt else shape.mask_flops()
        steps = blocks * shape.sparsegpt_steps() if sparsegpt else 0
        return Work(blocks * (2 * forward + extra), steps, 2 * blocks)
    if job.stage == "evaluate":  # every pass of windows goes through every block
        weights = shape.weights * dtype_bytes
        window = eval_pass_windows(weights, s, shape.hidden, dtype_bytes, 8, "cuda")
        passes = -(-n // window)
        return Work(blocks * forward + shape.head_flops(n, s), 0, passes * blocks)
    raise ValueError(f"no cost model for stage {job.stage!r}")


def offloaded(shape: Shape, dtype_bytes: int = 2) -> bool:
    """Whether the weights stay on the host and move to the GPU block by block."""
    return shape.weights * dtype_bytes > OFFLOAD_FRACTION * GPU_MEMORY_BYTES


def gpu_seconds(job: Job, shape: Shape, dtype_bytes: int = 2) -> float:
    """Predicted seconds of ``job`` on one H200-class GPU (see the module's docstring)."""
    done = work(job, shape, dtype_bytes)
    rate = GPU_COALITION_FLOPS * RELATIVE_THROUGHPUT[job.kind]
    load = shape.weights * dtype_bytes / GPU_LOAD_BYTES_PER_SECOND
    moved = 0.0
    if offloaded(shape, dtype_bytes):
        moved = done.forwards * shape.block_weights * dtype_bytes / GPU_OFFLOAD_BYTES_PER_SECOND
    return done.flops / rate + done.steps * GPU_STEP_SECONDS + load + moved + GPU_JOB_SECONDS


def probe_bytes(shape: Shape, level: float, pruner: str, dtype_bytes: int) -> dict[str, int]:
    """Disk of one probe level (``svnup.calibration.save_probe``), and of a run's pruned layers
    at a uniform ``level`` (``svnup.pruning.pruned_layers``, the same format): a bit per weight
    for the masks (bit-packed, then gzip, which shrinks a random mask at most by the entropy's
    shortfall from one bit), and for a pruner that rewrites weights (SparseGPT) the kept ones,
    ``n - round(level * n)`` of each layer's ``n``, in the model's dtype."""
    masks = values = 0
    for rows, n in shape.layers().values():
        weights = rows * n
        masks += -(-weights // 8)
        if PRUNERS[pruner].rewrites:
            values += (weights - round(level * weights)) * dtype_bytes
    return {"masks": shape.blocks * masks, "values": shape.blocks * values}


def trie_forwards(masks: Iterable[int], block_bits: Sequence[int], skip: bool = False) -> int:
    """Block forwards of the coalition evaluator's walk over ``masks`` (``block_bits[b]``: the
    mask bits of block b's players): at every block each distinct state of the coalitions that
    share the way there runs once; ``skip`` ablation runs no ablated block."""
    groups = [sorted(set(masks))]
    forwards = 0
    for bits in block_bits:
        next_groups = []
        for group in groups:
            branches: dict[int, list[int]] = {}
            for mask in group:
                branches.setdefault(mask & bits, []).append(mask)
            forwards += sum(1 for state in branches if not (skip and state))
            next_groups += branches.values()
        groups = next_groups
    return forwards


def eval_windows(dataset: str, seqlen: int, windows: int | None, size_bytes: int | None) -> int:
    """Windows an evaluation reads: the configured count, else the dataset's tokens by seqlen
    (a hub set's known count, a local file's bytes at ``BYTES_PER_TOKEN``)."""
    if dataset == "c4":
        found = C4_WINDOWS
    elif dataset in HUB_EVAL_TOKENS:
        found = HUB_EVAL_TOKENS[dataset] // seqlen
    else:
        found = (size_bytes or 0) // BYTES_PER_TOKEN // seqlen
    return found if windows is None else min(windows, found)


def summary(name: str, shape: Shape, jobs: Sequence[Job], dtype_bytes: int = 2) -> str:
    """One line: the plan's predicted GPU time in all and by stage."""
    by_stage: dict[str, list[float]] = {}
    for job in jobs:
        by_stage.setdefault(job.stage, []).append(gpu_seconds(job, shape, dtype_bytes))
    total = sum(sum(v) for v in by_stage.values())
    parts = ", ".join(
        f"{stage} {len(v)} x {sum(v) / len(v) / 60:.1f}" for stage, v in by_stage.items()
    )
    return (
        f"svnup: predicted GPU time of {name}'s {len(jobs)} model jobs: {total / 60:.0f} min on "
        f"one H200-class GPU ({parts} min; benchmarks/results/scale.md)"
    )


def result_model(target: str) -> str | None:
    """The model a requested output belongs to (``results/MODEL/...``), if it is one."""
    parts = target.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "results" else None


def model_config(path: str, revision: str | None = None) -> dict:
    """A model's config.json, from its folder or the hub (through the hub's cache; no torch)."""
    import json
    from pathlib import Path

    folder = Path(path).expanduser()
    if folder.is_dir():
        return json.loads((folder / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "config.json", revision=revision)).read_text())
