"""One block engine for decoder-only LMs: load, capture block inputs, run blocks, score.

Every stage (perplexity, pruning, coalition evaluation) works on the same view of a model: an
input stage (embeddings, positions), decoder blocks mapping hidden states to hidden states,
and an output stage (final norm, projection, LM head). Model families differ only in where those
modules live and whether the logits are soft-capped, so a family is a small table entry chosen by
``config.model_type`` (``svnup.families``). What each block receives besides its hidden states
(masks, rotary embeddings) is captured from the model's own forward, block by block, so families
whose layers differ (sliding-window and global attention in Gemma 2/3) need nothing of their own.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from svnup import costs
from svnup.families import family_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; a no-op where
    there is none). A loop over blocks frees buffers of many sizes, which glibc keeps: writing a
    SparseGPT probe grew the job's peak by 0.4x the model over 16 blocks without this
    (benchmarks/results/scale.md). Once a block it costs no measurable time there (47.3 against
    47.2 CPU s); one trim of a fragmented 2.4 GB heap took 0.24 s."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} requested but CUDA is not available; use device: cpu"
        )
    return device


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer of a block, by its name inside the block (the pruning targets)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _linear_weights(block: nn.Module) -> int:
    return sum(m.weight.numel() for m in linear_layers(block).values())


_STATEFUL = ("cache", "past_key_values")  # generation state, never passed on to the blocks


class _StopForward(Exception):
    """Raised by the last catcher once it has seen its inputs."""


class _Catcher(nn.Module):
    """Stands in for a block to record what the model passes it; passes the hidden states on."""

    def __init__(self, block: nn.Module, stop: bool) -> None:
        super().__init__()
        self.block = block
        self.stop = stop
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise TypeError("blocks are expected to receive keyword arguments after hidden_states")
        self.hidden = hidden_states
        self.kwargs = kwargs
        if self.stop:
            raise _StopForward
        return hidden_states


Span = tuple[int, int, int]  # (row, first position, end position) of a chunk of predictions


@dataclass(frozen=True)
class BlockKwargs:
    """The keyword arguments (masks, position embeddings, ...) the model passes each block.

    Captured per block, because blocks differ: sliding-window and global attention layers get
    different masks, and in Gemma 3 different rotary embeddings. Blocks of one attention type
    share the same tensors. ``kwargs[b]`` is what block ``b`` receives.
    """

    per_block: tuple[dict, ...]

    def __getitem__(self, index: int) -> dict:
        return self.per_block[index]


class BlockModel:
    """A causal LM seen as input stage -> blocks -> output stage, on a compute device.

    With ``offload`` the weights stay on the CPU and each stage is moved to the compute device only
    while it runs, so a model larger than the device can still be pruned block by block.
    ``mapped`` holds the data pointers of weights that are read-only views of a memory-mapped
    checkpoint (``load_model``): they are never written, a stage that changes a block's weights
    gets its own copy of that block first.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        offload: bool | str = "auto",
        batch_size: int = 8,
        mapped: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model.eval()
        self.family = family_of(model.config.model_type)
        self.device = resolve_device(device)
        self.blocks: nn.ModuleList = _get(model, self.family.blocks)
        self.batch_size = batch_size
        self.dtype = next(model.parameters()).dtype
        self.logit_softcap: float | None = (
            getattr(model.config, "final_logit_softcapping", None) if self.family.softcap else None
        )
        self.offload = self._decide_offload(offload)
        self.mapped = mapped
        self._resident: dict[int, int] = {}
        self._saved: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._written: set[int] = set()
        if not self.offload:
            self.model.to(self.device)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        """Entries of the output head's next-token distribution."""
        return _get(self.model, self.family.head).out_features

    @functools.cached_property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def logit_chunk_tokens(self) -> int:
        """Positions whose float32 logits are made at once: one chunk takes a working share of
        the weights (``svnup.costs.working_bytes``; a 4,096-token chunk of a 128K vocabulary
        would be 2 GB, a sixth of an 8B model)."""
        budget = costs.working_bytes(self.weight_bytes, device_type=self.device.type)
        return max(1, budget // (self.vocab_size * 4))

    def _decide_offload(self, offload: bool | str) -> bool:
        if offload != "auto":
            return bool(offload)
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.weight_bytes > 0.7 * free

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module | None, write: bool = False) -> Iterator[None]:
        """Keep ``modules`` on the compute device for the duration (a no-op without offload).

        Re-entrant: a module entered twice goes back to the CPU only when the outer use ends.
        Going back, each tensor takes again the CPU tensor it had (no copy: a memory-mapped
        checkpoint stays mapped, and host memory does not grow block by block), unless some use
        said ``write``: it changes the weights, which then come back as they are. On the CPU
        itself ``write`` gives memory-mapped weights a private copy, since a mapping is read-only.
        """
        present = [m for m in modules if m is not None]
        if not self.offload:
            if write:
                for module in present:
                    self._own(module)
            yield
            return
        for module in present:
            key = id(module)
            if self._resident.get(key, 0) == 0:
                self._saved[key] = _move(module, self.device)
            self._resident[key] = self._resident.get(key, 0) + 1
            if write:
                self._written.add(key)
        try:
            yield
        finally:
            for module in present:
                key = id(module)
                self._resident[key] -= 1
                if self._resident[key] == 0:
                    saved = self._saved.pop(key)
                    if key in self._written:
                        self._written.discard(key)
                        module.to("cpu")
                    else:
                        for tensor, before in saved:
                            tensor.data = before

    def _own(self, module: nn.Module) -> None:
        """Replace memory-mapped (read-only) weights of ``module`` by private copies."""
        for param in module.parameters():
            if param.data_ptr() in self.mapped:
                param.data = param.data.clone()

    def _stage(self, paths: tuple[str, ...]) -> list[nn.Module]:
        return [m for m in (_get(self.model, p) for p in paths) if m is not None]

    def block_params(self) -> list[int]:
        """Number of prunable (linear) weights per block, the weights of the weighted mean."""
        return [_linear_weights(block) for block in self.blocks]

    def _capture(self, input_ids: torch.Tensor, last: int) -> list[_Catcher]:
        """Run the model on ``input_ids`` with catchers standing in for blocks 0..``last``."""
        catchers = [_Catcher(self.blocks[i], stop=i == last) for i in range(last + 1)]
        for index, catcher in enumerate(catchers):
            self.blocks[index] = catcher
        try:
            with contextlib.suppress(_StopForward):
                self.model(input_ids=input_ids.to(self.device), use_cache=False)
        finally:
            for index, catcher in enumerate(catchers):
                self.blocks[index] = catcher.block
        return catchers

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, BlockKwargs]:
        """Hidden states entering block 0 for every sequence, and every block's keyword arguments.

        The keyword arguments are whatever the model itself passes each block, captured from a
        one-sequence forward (with the blocks replaced by pass-through catchers) so they broadcast
        over any batch size.
        """
        batches = input_ids.split(self.batch_size)
        with self.on_device(*self._stage(self.family.inputs)):
            catchers = self._capture(input_ids[:1], last=self.n_blocks - 1)
            hidden = torch.cat([self._capture(batch, last=0)[0].hidden for batch in batches])
        per_block = []
        for index, catcher in enumerate(catchers):
            if catcher.kwargs is None:
                raise RuntimeError(f"the model's forward never called block {index}")
            kwargs = {k: v for k, v in catcher.kwargs.items() if k not in _STATEFUL}
            per_block.append({**kwargs, "use_cache": False})
        return hidden, BlockKwargs(tuple(per_block))

    @torch.no_grad()
    def forward_block(self, index: int, hidden: torch.Tensor, kwargs: BlockKwargs) -> torch.Tensor:
        """Run block ``index`` on ``hidden`` [N, T, d] in micro-batches; returns the new states."""
        block = self.blocks[index]
        block_kwargs = kwargs[index]
        with self.on_device(block):
            out = torch.empty_like(hidden)
            for start in range(0, hidden.shape[0], self.batch_size):
                out[start : start + self.batch_size] = block(
                    hidden[start : start + self.batch_size], **block_kwargs
                )
        return out

    def forward_blocks(
        self, hidden: torch.Tensor, kwargs: BlockKwargs, blocks: range | None = None, desc: str = ""
    ) -> torch.Tensor:
        """Propagate ``hidden`` through ``blocks`` (all by default), with a progress bar."""
        blocks = range(self.n_blocks) if blocks is None else blocks
        for index in tqdm(blocks, desc=desc or "blocks", leave=False, disable=not desc):
            hidden = self.forward_block(index, hidden, kwargs)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits of the last block's output (soft cap applied as the model's
        forward applies it: in the model's dtype)."""
        for module in self._stage(self.family.outputs):
            hidden = module(hidden)
        logits = _get(self.model, self.family.head)(hidden)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()

    def _token_chunks(self, input_ids: torch.Tensor, chunk_tokens: int | None) -> list[list[Span]]:
        """Every predicted position (each row's but the last) in chunks of at most
        ``chunk_tokens`` (default ``logit_chunk_tokens``), as (row, start, stop) spans in order;
        a chunk spans rows where they are short and splits a row where it is long."""
        n, seqlen = input_ids.shape
        step = chunk_tokens or self.logit_chunk_tokens
        chunks: list[list[Span]] = [[]]
        room = step
        for row in range(n):
            start = 0
            while start < seqlen - 1:
                stop = min(seqlen - 1, start + room)
                chunks[-1].append((row, start, stop))
                room -= stop - start
                start = stop
                if not room:
                    chunks.append([])
                    room = step
        return [chunk for chunk in chunks if chunk]

    def _chunk_logits(self, hidden: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        states = torch.cat([hidden[row, start:stop] for row, start, stop in spans])
        return self._logits(states.to(self.device))

    @torch.no_grad()
    def next_token_probs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int | None = None
    ) -> list[torch.Tensor]:
        """Float32 next-token distributions of a last-block output, one tensor per chunk of
        ``sequence_nll`` (pass them as its ``reference_probs``, with the same ``chunk_tokens``)."""
        head = _get(self.model, self.family.head)
        with self.on_device(head, *self._stage(self.family.outputs)):
            return [
                self._chunk_logits(hidden, spans).softmax(-1)
                for spans in self._token_chunks(input_ids, chunk_tokens)
            ]

    @torch.no_grad()
    def sequence_nll(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        chunk_tokens: int | None = None,
        reference: torch.Tensor | None = None,
        reference_probs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Summed next-token NLL of each sequence (float64 [N]) from the last block's output.

        With ``reference`` (another last-block output of the same sequences, such as the dense
        model's), the targets are its next-token distributions instead of the text's tokens: the
        cross-entropy H(p_ref, p), which is KL(p_ref || p) plus the reference's own entropy.
        ``reference_probs`` are those distributions computed once by ``next_token_probs`` (same
        ``chunk_tokens``), for a caller that scores many outputs against one reference.
        Logits are produced ``chunk_tokens`` positions at a time (``logit_chunk_tokens`` by
        default), so the float32 logits never take more than a few percent of the weights.
        """
        head = _get(self.model, self.family.head)
        outputs = self._stage(self.family.outputs)
        targets = input_ids[:, 1:].to(self.device)
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float64)
        with self.on_device(head, *outputs):
            for chunk, spans in enumerate(self._token_chunks(input_ids, chunk_tokens)):
                logits = self._chunk_logits(hidden, spans)
                if reference is None and reference_probs is None:
                    wanted = torch.cat([targets[row, start:stop] for row, start, stop in spans])
                    nll = F.cross_entropy(logits, wanted, reduction="none")
                else:
                    expected = (
                        reference_probs[chunk]
                        if reference_probs is not None
                        else self._chunk_logits(reference, spans).softmax(-1)
                    )
                    nll = -(expected * logits.log_softmax(-1)).sum(-1)
                del logits
                nll = nll.double().cpu()
                offset = 0
                for row, start, stop in spans:
                    sums[row] += nll[offset : offset + stop - start].sum()
                    offset += stop - start
        return sums

    def windows_per_pass(self, seqlen: int) -> int:
        """Evaluation windows a pass holds (``svnup.costs.eval_pass_windows``)."""
        hidden = self.model.config.get_text_config().hidden_size
        return costs.eval_pass_windows(
            self.weight_bytes,
            seqlen,
            hidden,
            self.dtype.itemsize,
            self.batch_size,
            self.device.type,
        )


def _move(module: nn.Module, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move the CPU parameters and buffers of ``module`` to ``device`` in place; returns each
    moved tensor with the data it had."""
    moved = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "cpu":
            moved.append((tensor, tensor.data))
            tensor.data = tensor.data.to(device)
    return moved


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a local checkpoint (those its index names, when sharded); empty
    for a hub id or a checkpoint in another format."""
    folder = Path(folder).expanduser()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_only_tensors(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Every tensor of ``files`` as a read-only view of the file mapped into memory (None if a
    tensor is not stored in ``dtype``, which would need a converted copy). A shared read-only
    mapping is page cache, not memory of the process: it counts in no RLIMIT_DATA, and pages the
    kernel needs back are dropped and read again, so weights larger than the memory still run."""
    import mmap
    import struct
    import warnings

    tensors = {}
    for path in files:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        (length,) = struct.unpack("<Q", mapping[:8])
        header = json.loads(mapping[8 : 8 + length])
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if _SAFETENSORS_DTYPES.get(entry["dtype"]) != dtype:
                return None
            start, end = entry["data_offsets"]
            count = (end - start) // dtype.itemsize
            if count == 0:
                tensors[name] = torch.empty(entry["shape"], dtype=dtype)
                continue
            with warnings.catch_warnings():  # "not writable": svnup never writes a mapped weight
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(
                    mapping, dtype=dtype, count=count, offset=8 + length + start
                )
            tensors[name] = flat.view(entry["shape"])
    return tensors


def _status_bytes(field: str) -> int:
    """A VmData / VmSize line of /proc/self/status in bytes (0 where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), None without a limit."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                folder = Path("/sys/fs/cgroup") / path.lstrip("/")
                limit, usage = folder / "memory.max", folder / "memory.current"
            elif "memory" in controllers.split(","):
                folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                limit, usage = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
            else:
                continue
            if limit.is_file() and limit.read_text().strip() not in ("max", ""):
                value = int(limit.read_text())
                if value < 1 << 60:  # v1 writes "no limit" as a huge number
                    return value - int(usage.read_text())
    return None


def host_memory_budget() -> int:
    """Bytes this process can still take: the least of the host's available memory, the room
    under its cgroup limit (a container, a SLURM job) and under RLIMIT_DATA and RLIMIT_AS."""
    import resource

    room = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    cgroup = _cgroup_room()
    if cgroup is not None:
        room.append(cgroup)
    for limit, used in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            room.append(soft - _status_bytes(used))
    return max(0, min(room)) if room else 1 << 62


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    offload: bool | str = "auto",
    batch_size: int = 8,
    with_tokenizer: bool = True,
    revision: str | None = None,
    mapped: bool | str = "auto",
) -> tuple[BlockModel, object | None]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Returns the block view of the model (weights on the CPU or the device, see ``offload``) and the
    tokenizer (None when ``with_tokenizer`` is off). The model type is checked before any weights
    are read. ``revision`` (branch, tag or commit) applies to hub ids. ``mapped`` keeps a local
    safetensors checkpoint's weights as read-only views of the mapped files; ``auto`` does so
    when they exceed the memory this process can still take (``host_memory_budget``) and are
    stored in ``dtype``, so a model larger than the host runs block by block from the disk.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(
            f"model path {source!r} does not exist; give a local model directory or a hub id"
        )
    config = AutoConfig.from_pretrained(source, revision=revision)
    family_of(config.model_type)
    resolve_device(device)
    dtype = resolve_dtype(dtype)
    files = weight_files(source) if looks_local else []
    state = None
    if files and (
        mapped is True
        or (mapped == "auto" and sum(p.stat().st_size for p in files) > host_memory_budget())
    ):
        state = _read_only_tensors(files, dtype)
    if mapped is True and state is None:
        raise ValueError(
            f"model {source!r} cannot be memory-mapped in {dtype}: it needs safetensors weights "
            "stored in that dtype"
        )
    if state is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=revision)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    views = frozenset(t.data_ptr() for t in (state or {}).values())
    engine = BlockModel(model, device=device, offload=offload, batch_size=batch_size, mapped=views)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision) if with_tokenizer else None
    return engine, tokenizer
