"""Calibration samples and evaluation token streams, following the SparseGPT / Wanda protocols.

Pruning results are only comparable across papers when the text is joined, tokenised and cut
exactly as they did, so this module pins those choices down in one place:

* Evaluation streams (``eval_stream``): WikiText-2 rows joined with ``"\\n\\n"``; PTB sentences
  (whitespace-stripped, as the hub rows are) joined with ``" "``; the first 1,100 C4 documents
  joined with ``" "`` and cut to ``256 * seqlen`` tokens; other ("plain") files joined with
  ``"\\n\\n"``. The joined text is tokenised in one call and cached on disk.
* Calibration (``calibration_samples``): a seeded ``random.Random`` draws documents and keeps a
  random window of ``seqlen`` tokens from those longer than ``seqlen``. WikiText-2 and PTB are
  "streams": the whole split, joined with ``" "`` as both papers do for calibration, is one
  document and no document index is drawn, so the windows match theirs for the same seed.

Sources are hub names (``wikitext2``, ``ptb``, ``c4``; hub names win over a same-named local
directory, write ``./c4`` for the directory), ``.jsonl`` files (``"text"`` field), ``.txt`` files
(one row per line) or ``.parquet`` files (``"text"`` column), or a directory holding one such
file per split: the single file whose name, split at ``.``, ``-`` and ``_``, contains the split
name (``validation`` also matches ``valid`` and ``val``), e.g. ``test.jsonl`` or
``ptb.valid.txt``. A file source is its own split. The protocol of a path is read from its name,
then its parent directory's name: ``wikitext*`` -> wikitext2, ``ptb``/``penn`` -> ptb, ``c4``
-> c4, otherwise plain.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tokens are made, so checking a source stays light
    import torch

HUB_NAMES = ("wikitext2", "ptb", "c4")
SUFFIXES = (".jsonl", ".txt", ".parquet")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val"),
    "test": ("test",),
}
STREAM_PROTOCOLS = ("wikitext2", "ptb")
C4_SHARDS = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
MAX_DRAWS_PER_SAMPLE = 100
CACHE_FORMAT = 1
ACCEPTED = (
    "a hub name (wikitext2, ptb, c4), a .jsonl/.txt/.parquet file, "
    "or a directory holding one such file per split"
)


def _unknown_source(source: str) -> ValueError:
    return ValueError(
        f"source {source!r} is neither a hub name nor an existing path; expected {ACCEPTED}"
    )


def _split_name(split: str) -> str:
    for name, aliases in SPLIT_ALIASES.items():
        if split.lower() in aliases:
            return name
    raise ValueError(f"split={split!r} is not one of train, validation (valid, val), test")


def _split_file(directory: Path, split: str) -> Path:
    aliases = SPLIT_ALIASES[split]
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    hits = [p for p in files if set(re.split(r"[.\-_]", p.name.lower())) & set(aliases)]
    if len(hits) != 1:
        found = ", ".join(p.name for p in (hits or files)) or "no .jsonl/.txt/.parquet files"
        raise ValueError(
            f"source directory {directory} needs exactly one file for split {split!r} "
            f"(its name containing {'/'.join(aliases)}), found: {found}; pass the file path instead"
        )
    return hits[0]


def _locate(source: str, split: str) -> Path | None:
    """The file that holds ``split`` of ``source``, or None for a hub name."""
    if source in HUB_NAMES:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return _split_file(path, split).resolve()
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"source {source!r} has an unsupported suffix; expected {ACCEPTED}")
        return path.resolve()
    raise _unknown_source(source)


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".parquet":
        import pandas as pd

        return [str(t) for t in pd.read_parquet(path, columns=["text"])["text"]]
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise ValueError(f"{path} line {number} has no 'text' field; each row needs one")
            rows.append(record["text"])
    return rows


def _check_hub_split(name: str, split: str) -> None:
    if name == "c4" and split not in C4_SHARDS:
        raise ValueError(f"split={split!r} is not available for c4; use train or validation")


def _load_hub(name: str, split: str) -> list[str]:
    _check_hub_split(name, split)
    from datasets import load_dataset

    if name == "wikitext2":
        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if name == "ptb":
        return list(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
    return list(
        load_dataset("allenai/c4", data_files={split: C4_SHARDS[split]}, split=split)["text"]
    )


def check_source(source: str, split: str) -> None:
    """Raise a one-line ValueError unless ``split`` of ``source`` can be read: a known split name,
    a split the hub dataset has, an existing file or a directory with one file for the split.
    Reads no rows, so a workflow can check every source before its first job."""
    split = _split_name(split)
    _check_hub_split(source, split)
    _locate(source, split)


def split_file(source: str, split: str) -> Path | None:
    """The local file that holds ``split`` of ``source`` (None for a hub name)."""
    return _locate(source, _split_name(split))


def load_texts(source: str, split: str) -> list[str]:
    """Rows of ``split`` of ``source`` (hub name, file or per-split directory), unjoined."""
    split = _split_name(split)
    path = _locate(source, split)
    return _load_hub(source, split) if path is None else _read_file(path)


def eval_protocol(source: str) -> str:
    """How ``source`` is joined: "wikitext2", "ptb", "c4" or "plain", read from its name."""
    if source in HUB_NAMES:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise _unknown_source(source)
    path = path.resolve()
    for name in (path.name, path.parent.name):
        words = set(re.split(r"[^a-z0-9]+", name.lower()))
        if any(w.startswith("wikitext") for w in words):
            return "wikitext2"
        if words & {"ptb", "penn", "penntreebank"}:
            return "ptb"
        if "c4" in words:
            return "c4"
    return "plain"


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids.long()


def _space_joined(protocol: str, texts: list[str]) -> str:
    return " ".join(t.strip() for t in texts) if protocol == "ptb" else " ".join(texts)


def _eval_text(protocol: str, texts: list[str]) -> str:
    if protocol == "ptb":
        return _space_joined(protocol, texts)
    if protocol == "c4":
        return " ".join(texts[:C4_EVAL_DOCUMENTS])
    return "\n\n".join(texts)


def _tokenizer_identity(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "size": len(tokenizer),
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def _cache_file(tokenizer, source: str, split: str, protocol: str, seqlen: int, cache_dir) -> Path:
    path = _locate(source, split)
    if path is None:
        identity = {"hub": source}
    else:
        stat = path.stat()
        identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = {
        "format": CACHE_FORMAT,
        "source": identity,
        "split": split,
        "protocol": protocol,
        "tokenizer": _tokenizer_identity(tokenizer),
        "seqlen": seqlen if protocol == "c4" else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    if cache_dir is None:
        cache_dir = os.environ.get("SVNUP_CACHE") or Path.home() / ".cache" / "svnup" / "tokens"
    return Path(cache_dir).expanduser() / f"{protocol}-{split}-{digest}.pt"


def _save_atomic(ids: torch.Tensor, target: Path) -> None:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ids, f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def eval_stream(
    tokenizer,
    source: str,
    split: str = "test",
    seqlen: int = 2048,
    cache_dir: str | Path | None = None,
) -> torch.LongTensor:
    """The ``[1, T]`` token stream perplexity is measured on, tokenised once and cached.

    The cache (``cache_dir``, else ``$SVNUP_CACHE``, else ``~/.cache/svnup/tokens``) is keyed by
    the source (path, size and mtime for files), split, protocol, tokenizer (name, size, vocab
    hash) and, for c4 only, ``seqlen``; editing a file or changing tokenizer invalidates it.
    """
    import torch

    split = _split_name(split)
    protocol = eval_protocol(source)
    target = _cache_file(tokenizer, source, split, protocol, seqlen, cache_dir)
    if target.exists():
        return torch.load(target, weights_only=True)
    ids = _tokenize(tokenizer, _eval_text(protocol, load_texts(source, split)))
    if protocol == "c4":
        ids = ids[:, : C4_EVAL_WINDOWS * seqlen].clone()
    _save_atomic(ids, target)
    return ids


def calibration_samples(
    tokenizer,
    source: str,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    split: str = "train",
) -> torch.LongTensor:
    """``[nsamples, seqlen]`` random windows of calibration text, reproducible from ``seed``.

    Each draw picks a document (except for stream sources, which are one document), tokenises
    it, and keeps a random window if the document has more than ``seqlen`` tokens.
    """
    import torch

    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples={nsamples} and seqlen={seqlen} must both be at least 1")
    protocol = eval_protocol(source)
    texts = load_texts(source, split)
    if protocol in STREAM_PROTOCOLS:
        texts = [_space_joined(protocol, texts)]
    if not texts:
        raise ValueError(f"source {source!r} split {split!r} has no rows to calibrate on")
    rng = random.Random(seed)
    tokens: dict[int, torch.Tensor] = {}
    samples = []
    for _ in range(MAX_DRAWS_PER_SAMPLE * nsamples):
        if len(samples) == nsamples:
            break
        doc = 0 if protocol in STREAM_PROTOCOLS else rng.randint(0, len(texts) - 1)
        if doc not in tokens:
            tokens[doc] = _tokenize(tokenizer, texts[doc])
        ids = tokens[doc]
        if ids.shape[1] > seqlen:
            start = rng.randint(0, ids.shape[1] - seqlen - 1)
            samples.append(ids[:, start : start + seqlen])
    if len(samples) < nsamples:
        raise ValueError(
            f"found {len(samples)} of {nsamples} documents longer than seqlen={seqlen} tokens in "
            f"source {source!r} split {split!r}; lower seqlen or use a source with longer texts"
        )
    return torch.cat(samples, dim=0)
