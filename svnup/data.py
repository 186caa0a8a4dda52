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
``ptb.valid.txt``. A file source is its own split. A hub name is read with its own protocol; a
path with the protocol given (the workflow's ``evaluation.protocols`` and ``calibration.protocol``)
or, by default, one guessed from its name, then its parent directory's name: ``wikitext*`` ->
wikitext2, ``ptb``/``penn`` -> ptb, ``c4`` -> c4, otherwise plain. A renamed copy of PTB is
"plain" unless its protocol is given.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tokens are made, so checking a source stays light
    import torch

log = logging.getLogger("svnup")
HUB_NAMES = ("wikitext2", "ptb", "c4")
PROTOCOLS = (*HUB_NAMES, "plain")
# What load_dataset reads for each hub name: repository, configuration and the text column.
HUB_SOURCES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "c4": ("allenai/c4", None, "text"),
}
HUB_TIMEOUT = 3.0  # seconds the checks before planning wait for the hub to answer
FIRST_ROWS = 8  # rows of a local file read by check_source
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
    """The rows of a data file; a row that cannot be read is named with its line."""
    if path.suffix == ".txt":
        return _text(path).splitlines()
    if path.suffix == ".parquet":
        import pandas as pd

        return [str(t) for t in pd.read_parquet(path, columns=["text"])["text"]]
    rows = []
    for number, line in enumerate(io.StringIO(_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(
                f"{path}: line {number} column {error.colno} is not valid JSON ({error.msg}): "
                "fix the row or remove it"
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}: line {number} has no 'text' field: give each row one")
        rows.append(record["text"])
    return rows


def _text(path: Path) -> str:
    """A data file decoded as UTF-8, or a one-line error with the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 text (byte {data[error.start]:#04x}): save the "
            "file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 FILE > FILE.utf8)"
        ) from None


def _check_hub_split(name: str, split: str) -> None:
    if name == "c4" and split not in C4_SHARDS:
        raise ValueError(f"split={split!r} is not available for c4; use train or validation")


def _load_hub(name: str, split: str) -> list[str]:
    _check_hub_split(name, split)
    from datasets import load_dataset

    repo, configuration, column = HUB_SOURCES[name]
    args = (repo,) if configuration is None else (repo, configuration)
    files = {"data_files": {split: C4_SHARDS[split]}} if name == "c4" else {}
    return list(load_dataset(*args, **files, split=split)[column])


def _check_rows(path: Path) -> None:
    """The first rows of a local file can be read: UTF-8 text, and for .jsonl and .parquet a
    string ``text`` field; a file with no rows at all is refused too."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(path)
        except Exception as error:  # pyarrow raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable parquet file ({error})") from None
        if "text" not in metadata.schema.names:
            raise ValueError(f"{path} has no 'text' column; each row needs one")
        if metadata.num_rows == 0:
            raise ValueError(f"{path} has no rows; give a file with text in it")
        return
    rows, number = 0, 0
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):  # noqa: B007 (read after the loop)
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    _check_record(path, number, line)
                rows += 1
                if rows == FIRST_ROWS:
                    break
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not UTF-8 text (near line {number + 1}); save it as UTF-8"
        ) from None
    if not rows:
        raise ValueError(f"{path} has no rows; give a file with text in it")


def _check_record(path: Path, number: int, line: str) -> None:
    try:
        record = json.loads(line)
    except ValueError:
        raise ValueError(f"{path} line {number} is not JSON; write one object a line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path} line {number} has no 'text' string; each row needs one")


def _offline() -> bool:
    """Hugging Face's offline switches, read as ``datasets`` reads them."""
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _datasets_cache() -> Path:
    """The folder where ``datasets`` keeps prepared datasets (its HF_DATASETS_CACHE)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    folder = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    return Path(folder).expanduser()


def _hub_cached(name: str, split: str) -> bool:
    """Whether a load of ``split`` of hub dataset ``name`` left its prepared copy in the datasets
    cache, where ``load_dataset`` finds it offline: <repo with / as ___>/<configuration>/
    <version>/<hash>/dataset_info.json naming the split."""
    repo, configuration, _ = HUB_SOURCES[name]
    root = _datasets_cache() / repo.replace("/", "___")
    for info in root.glob(f"{configuration or '*'}/*/*/dataset_info.json"):
        try:
            if split in json.loads(info.read_text()).get("splits", {}):
                return True
        except (OSError, ValueError):
            continue
    return False


def _hub_answers(name: str) -> str | None:
    """None when the hub answers about ``name``'s repository within HUB_TIMEOUT seconds (any
    HTTP status: access and existence are for the load to report), else why not."""
    import urllib.error
    import urllib.request

    if _offline():
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(
        f"{endpoint}/api/datasets/{HUB_SOURCES[name][0]}", method="HEAD"
    )
    try:
        urllib.request.urlopen(request, timeout=HUB_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:  # URLError and timeouts are OSErrors
        return f"{endpoint} did not answer in {HUB_TIMEOUT:g} s ({error.__class__.__name__})"
    return None


def check_hub(name: str, split: str) -> None:
    """Raise a one-line ValueError unless ``split`` of hub dataset ``name`` can be loaded: it is
    in the local datasets cache, or the hub answers (a short request)."""
    split = _split_name(split)
    _check_hub_split(name, split)
    if _hub_cached(name, split):
        return
    why = _hub_answers(name)
    if why is not None:
        raise ValueError(
            f"hub dataset {name} ({split} split) is not in the Hugging Face datasets cache "
            f"({_datasets_cache()}) and cannot be downloaded: {why}; run once online to cache "
            "it, or give a local .jsonl/.txt/.parquet file with its text"
        )


def check_source(source: str, split: str) -> None:
    """Raise a one-line ValueError unless ``split`` of ``source`` can be read: a known split name,
    a split the hub dataset has, an existing file or a directory with one file for the split,
    whose first rows are text (and have a ``text`` field where one is read). Reads at most
    ``FIRST_ROWS`` rows and does not touch the network, so a workflow can check every source
    before its first job (``check_hub`` checks that a hub dataset can be had)."""
    split = _split_name(split)
    _check_hub_split(source, split)
    path = _locate(source, split)
    if path is not None:
        _check_rows(path)


def split_file(source: str, split: str) -> Path | None:
    """The local file that holds ``split`` of ``source`` (None for a hub name)."""
    return _locate(source, _split_name(split))


def load_texts(source: str, split: str) -> list[str]:
    """Rows of ``split`` of ``source`` (hub name, file or per-split directory), unjoined."""
    split = _split_name(split)
    path = _locate(source, split)
    return _load_hub(source, split) if path is None else _read_file(path)


def resolve_protocol(source: str, protocol: str | None = None) -> str:
    """The protocol ``source`` is read with: ``protocol`` where given, else the one its name
    suggests (``eval_protocol``). A hub name is only read with its own protocol."""
    if protocol is None:
        return eval_protocol(source)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if source in HUB_NAMES and protocol != source:
        raise ValueError(f"hub dataset {source} is read with protocol {source}, not {protocol}")
    return protocol


def eval_protocol(source: str) -> str:
    """How ``source`` is joined by default: "wikitext2", "ptb", "c4" or "plain", read from its
    name."""
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
    """What decides the tokens, not where the tokenizer was read from: a fast tokenizer's whole
    pipeline (normaliser, pre-tokeniser, vocabulary and merges, post-processor), so the copy a
    pruned checkpoint saves shares the cache of the model it came from; for another tokenizer its
    name, size and vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = hashlib.sha256(backend.to_str().encode()).hexdigest()
        return {"class": type(tokenizer).__name__, "pipeline": pipeline}
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
    return Path(cache_dir or svnup_cache()).expanduser() / f"{protocol}-{split}-{digest}.pt"


def svnup_cache() -> Path:
    """svnup's cache of derived files (token streams, the harness's task index), which can be
    rebuilt at any time: ``$SVNUP_CACHE``, else ``~/.cache/svnup/tokens``."""
    return Path(os.environ.get("SVNUP_CACHE") or Path.home() / ".cache" / "svnup" / "tokens")


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


def _load_cached(target: Path) -> torch.LongTensor | None:
    """A cached ``[1, T]`` token stream, or None (with a warning naming the file) when the file
    cannot be one: it is only a cache, so the caller tokenises again and replaces it."""
    import torch

    try:
        ids = torch.load(target, weights_only=True)
    except Exception as error:  # torch reports damage as one of several error types
        reason = " ".join(f"{error.__class__.__name__}: {error}".split())[:200]
    else:
        if isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.shape[:1] == (1,):
            return ids
        reason = f"holds {type(ids).__name__} {getattr(ids, 'shape', '')}, not a [1, T] stream"
    log.warning("token cache %s is damaged (%s); tokenising again to rebuild it", target, reason)
    return None


def eval_stream(
    tokenizer,
    source: str,
    split: str = "test",
    seqlen: int = 2048,
    cache_dir: str | Path | None = None,
    protocol: str | None = None,
) -> torch.LongTensor:
    """The ``[1, T]`` token stream perplexity is measured on, tokenised once and cached;
    ``protocol`` says how the rows are joined (guessed from the name when None).

    The cache (``cache_dir``, else ``$SVNUP_CACHE``, else ``~/.cache/svnup/tokens``) is keyed by
    the source (path, size and mtime for files), split, protocol, tokenizer (its content, not its
    folder: ``_tokenizer_identity``) and, for c4 only, ``seqlen``; editing a file or changing
    tokenizer invalidates it. A damaged cache file is tokenised again and replaced, with a
    warning that names it.
    """
    split = _split_name(split)
    protocol = resolve_protocol(source, protocol)
    target = _cache_file(tokenizer, source, split, protocol, seqlen, cache_dir)
    if target.exists():
        ids = _load_cached(target)
        if ids is not None:
            return ids
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
    protocol: str | None = None,
) -> torch.LongTensor:
    """``[nsamples, seqlen]`` random windows of calibration text, reproducible from ``seed``.

    Each draw picks a document (except for stream sources, which are one document: wikitext2 and
    ptb, by ``protocol`` or, when None, by the source's name), tokenises it, and keeps a random
    window if the document has more than ``seqlen`` tokens.
    """
    import torch

    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples={nsamples} and seqlen={seqlen} must both be at least 1")
    protocol = resolve_protocol(source, protocol)
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
