"""Perplexity with the protocol of the SparseGPT / Wanda reference code.

The stream is cut into non-overlapping windows of ``seqlen`` tokens (the tail is dropped). Each
window contributes its mean next-token cross-entropy over ``seqlen - 1`` predictions, weighted by
``seqlen``; ``ppl = exp(sum / (n_windows * seqlen))``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from svnup.models import BlockModel


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float
    dataset: str
    split: str
    seqlen: int
    windows: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@torch.no_grad()
def stream_perplexity(
    model: BlockModel,
    stream: torch.Tensor,
    seqlen: int,
    *,
    dataset: str = "",
    split: str = "",
    windows_per_pass: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``stream`` ([1, T] token ids) under the block engine.

    Windows go through the blocks ``windows_per_pass`` at a time (default: as many as
    ``BlockModel.windows_per_pass`` lets a pass hold), so the hidden states held on the device
    stay a few percent of the weights however long the evaluation set is.
    """
    start_time = time.perf_counter()
    n_windows = stream.shape[-1] // seqlen
    if n_windows == 0:
        raise ValueError(
            f"{dataset or 'stream'} has {stream.shape[-1]} tokens, fewer than seqlen={seqlen}"
        )
    windows = stream.reshape(-1)[: n_windows * seqlen].view(n_windows, seqlen)
    weighted = 0.0
    windows_per_pass = windows_per_pass or model.windows_per_pass(seqlen)
    passes = -(-n_windows // windows_per_pass)
    name = Path(dataset).name or "stream"
    progress = tqdm(total=passes * model.n_blocks, desc=f"perplexity {name}", unit="block")
    for first in range(0, n_windows, windows_per_pass):
        batch = windows[first : first + windows_per_pass]
        hidden, kwargs = model.embed(batch)
        for index in range(model.n_blocks):
            hidden = model.forward_block(index, hidden, kwargs)
            progress.update(1)
        window_mean = model.sequence_nll(hidden, batch) / (seqlen - 1)
        weighted += float(window_mean.sum()) * seqlen
    progress.close()
    mean_nll = weighted / (n_windows * seqlen)
    return PerplexityResult(
        ppl=_exp(mean_nll),
        mean_nll=mean_nll,
        dataset=dataset,
        split=split,
        seqlen=seqlen,
        windows=n_windows,
        tokens=n_windows * seqlen,
        seconds=time.perf_counter() - start_time,
    )


def dataset_perplexity(
    model: BlockModel,
    tokenizer,
    source: str,
    *,
    split: str = "test",
    seqlen: int = 2048,
    windows: int | None = None,
    cache_dir: str | Path | None = None,
    protocol: str | None = None,
) -> PerplexityResult:
    """Perplexity on a named dataset (``wikitext2``, ``c4``, ``ptb``) or a local file, over its
    first ``windows`` windows of ``seqlen`` tokens (all by default), its rows joined by
    ``protocol`` (``svnup.data.eval_stream``)."""
    from svnup.data import eval_stream

    stream = eval_stream(
        tokenizer, source, split=split, seqlen=seqlen, cache_dir=cache_dir, protocol=protocol
    )
    if windows is not None:
        stream = stream[:, : windows * seqlen]
    return stream_perplexity(model, stream, seqlen, dataset=source, split=split)
