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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from svnup.families import family_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        offload: bool | str = "auto",
        batch_size: int = 8,
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
        self._resident: dict[int, int] = {}
        if not self.offload:
            self.model.to(self.device)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        """Entries of the output head's next-token distribution."""
        return _get(self.model, self.family.head).out_features

    def _decide_offload(self, offload: bool | str) -> bool:
        if offload != "auto":
            return bool(offload)
        if self.device.type != "cuda":
            return False
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        free, _ = torch.cuda.mem_get_info(self.device)
        return weight_bytes > 0.7 * free

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module | None) -> Iterator[None]:
        """Keep ``modules`` on the compute device for the duration (a no-op without offload).

        Re-entrant: a module entered twice goes back to the CPU only when the outer use ends.
        """
        present = [m for m in modules if m is not None]
        if not self.offload:
            yield
            return
        for module in present:
            if self._resident.get(id(module), 0) == 0:
                module.to(self.device)
            self._resident[id(module)] = self._resident.get(id(module), 0) + 1
        try:
            yield
        finally:
            for module in present:
                self._resident[id(module)] -= 1
                if self._resident[id(module)] == 0:
                    module.to("cpu")

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

    def _row_chunks(self, input_ids: torch.Tensor, chunk_tokens: int) -> list[slice]:
        n, seqlen = input_ids.shape
        step = max(1, chunk_tokens // seqlen)
        return [slice(start, start + step) for start in range(0, n, step)]

    @torch.no_grad()
    def next_token_probs(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 4096
    ) -> list[torch.Tensor]:
        """Float32 next-token distributions of a last-block output, one tensor per row chunk of
        ``sequence_nll`` (pass them as its ``reference_probs``)."""
        head = _get(self.model, self.family.head)
        with self.on_device(head, *self._stage(self.family.outputs)):
            return [
                self._logits(hidden[rows, :-1].to(self.device)).softmax(-1)
                for rows in self._row_chunks(input_ids, chunk_tokens)
            ]

    @torch.no_grad()
    def sequence_nll(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        chunk_tokens: int = 4096,
        reference: torch.Tensor | None = None,
        reference_probs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Summed next-token NLL of each sequence (float64 [N]) from the last block's output.

        With ``reference`` (another last-block output of the same sequences, such as the dense
        model's), the targets are its next-token distributions instead of the text's tokens: the
        cross-entropy H(p_ref, p), which is KL(p_ref || p) plus the reference's own entropy.
        ``reference_probs`` are those distributions computed once by ``next_token_probs`` (same
        ``chunk_tokens``), for a caller that scores many outputs against one reference.
        Logits are produced ``chunk_tokens`` at a time so a large vocabulary at a long sequence
        length never materialises the whole float32 logit tensor.
        """
        head = _get(self.model, self.family.head)
        outputs = self._stage(self.family.outputs)
        targets = input_ids[:, 1:].to(self.device)
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float64)
        with self.on_device(head, *outputs):
            for chunk, rows in enumerate(self._row_chunks(input_ids, chunk_tokens)):
                logits = self._logits(hidden[rows, :-1])
                if reference is None and reference_probs is None:
                    nll = F.cross_entropy(
                        logits.flatten(0, 1), targets[rows].flatten(), reduction="none"
                    ).view(logits.shape[:2])
                else:
                    expected = (
                        reference_probs[chunk]
                        if reference_probs is not None
                        else self._logits(reference[rows, :-1].to(logits.device)).softmax(-1)
                    )
                    nll = -(expected * logits.log_softmax(-1)).sum(-1)
                sums[rows] = nll.double().sum(dim=1).cpu()
        return sums


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    offload: bool | str = "auto",
    batch_size: int = 8,
    with_tokenizer: bool = True,
    revision: str | None = None,
) -> tuple[BlockModel, object | None]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Returns the block view of the model (weights on the CPU or the device, see ``offload``) and the
    tokenizer (None when ``with_tokenizer`` is off). The model type is checked before any weights
    are read. ``revision`` (branch, tag or commit) applies to hub ids.
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
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(dtype), revision=revision
    )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision) if with_tokenizer else None
    return BlockModel(model, device=device, offload=offload, batch_size=batch_size), tokenizer
