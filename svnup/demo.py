"""Offline demo model: a small LLaMA trained on documentation every Python installation ships.

The workflow's default target has to run end to end with no network, so instead of downloading a
checkpoint it trains its own: a byte-level BPE tokenizer and a LlamaForCausalLM with grouped-query
attention, on the language reference (`pydoc_data.topics`) plus the docstrings of a fixed list of
pure-Python standard-library modules. The defaults are sized so that training takes about a minute
on two CPU cores and the model still has enough blocks and MLP width for pruning to be meaningful.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

BOS, EOS = "<s>", "</s>"

# Pure-Python modules that import without side effects; sorted so the corpus order is fixed.
STDLIB_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "optparse",
    "pathlib",
    "pickle",
    "pickletools",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)
DEFAULT_STEPS = 400  # ~1M parameters over ~0.8M tokens: ~105 s on one core, less on two
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") add repetition, not language


def _docstrings(module_name: str) -> Iterator[str]:
    """Docstrings of a module, its own classes and functions, and their methods, by name."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isfunction(obj):
            yield inspect.getdoc(obj) or ""
        elif inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    yield inspect.getdoc(member) or ""


def corpus_documents() -> list[str]:
    """All demo documents in a fixed order: language-reference topics, then module docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    with warnings.catch_warnings():  # reading deprecated aliases' docs (typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        docs += [doc for name in STDLIB_MODULES for doc in _docstrings(name)]
    return [doc for doc in dict.fromkeys(d.strip() for d in docs) if len(doc) >= MIN_DOC_CHARS]


def _write_jsonl(path: Path, docs: list[str]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")


def _read_jsonl(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; build it with `python -m svnup demo corpus`")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def build_corpus(out_dir: Path, heldout_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write train.jsonl and heldout.jsonl under out_dir: the documents shuffled, then split.

    Documents are de-duplicated first, so the two splits never share a document. The result is
    deterministic for a given Python version (docstrings change between releases).
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 and 1")
    docs = corpus_documents()
    random.Random(seed).shuffle(docs)
    n_heldout = max(1, round(len(docs) * heldout_fraction))
    heldout, train = docs[:n_heldout], docs[n_heldout:]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", train)
    _write_jsonl(out_dir / "heldout.jsonl", heldout)
    return {
        "train_docs": len(train),
        "heldout_docs": len(heldout),
        "train_chars": sum(map(len, train)),
        "heldout_chars": sum(map(len, heldout)),
    }


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer that, like LLaMA's, starts every encoded sequence with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents tokenised (each BOS ... EOS) and concatenated into one long stream."""
    ids = tokenizer(texts)["input_ids"]
    return torch.tensor([t for doc in ids for t in [*doc, tokenizer.eos_token_id]])


def _chunks(stream: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping seqlen windows covering the stream (the ragged tail is dropped)."""
    n = stream.numel() // seqlen
    if n == 0:
        raise ValueError(f"the held-out text has fewer than seqlen={seqlen} tokens; lower seqlen")
    return stream[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seqlen: int, batch_size: int = 32) -> float:
    """Perplexity over non-overlapping seqlen windows, as the pruning evaluation measures it."""
    model.eval()
    chunks = _chunks(stream, seqlen)
    nll = 0.0
    for batch in chunks.split(batch_size):
        nll += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
    return math.exp(nll / chunks.shape[0])


def unigram_perplexity(
    train: torch.Tensor, heldout: torch.Tensor, seqlen: int, vocab: int
) -> float:
    """Perplexity of add-one-smoothed training token frequencies on the tokens the model predicts.

    This is the bar a trained model must clear clearly to show it learned more than frequencies.
    """
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[_chunks(heldout, seqlen)[:, 1:]].mean().item())


def train_demo_model(
    corpus_dir: Path,
    out_dir: Path,
    *,
    n_layers: int = 8,
    hidden: int = 96,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 1024,
    seqlen: int = 128,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    max_seconds: float | None = None,
) -> dict:
    """Train tokenizer and model on corpus_dir and save both to out_dir, all or nothing.

    Everything is written to out_dir.tmp first and renamed at the end, so an interrupted run never
    leaves a directory that looks like a finished model. Uses however many threads torch is set to;
    training stops early (schedule unchanged) once max_seconds have passed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: heads must divide hidden and "
            "kv_heads must divide heads"
        )
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if vocab_size <= 258:
        raise ValueError(f"vocab_size={vocab_size} must exceed the 256 bytes plus BOS and EOS")
    train_texts = _read_jsonl(corpus_dir / "train.jsonl")
    heldout_texts = _read_jsonl(corpus_dir / "heldout.jsonl")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        start = time.perf_counter()
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(train_texts, vocab_size)
        train_ids = _token_stream(tokenizer, train_texts)
        heldout_ids = _token_stream(tokenizer, heldout_texts)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=32 * math.ceil(8 * hidden / 3 / 32),  # LLaMA's 8/3 ratio
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=seqlen,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seqlen)
        losses: list[float] = []
        model.train()
        bar = tqdm(range(steps), desc="train demo model", unit="step", file=sys.stderr)
        for _ in bar:
            starts = torch.randint(train_ids.numel() - seqlen, (batch_size, 1), generator=generator)
            batch = train_ids[starts + offsets]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            bar.set_postfix(loss=losses[-1], refresh=False)
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
        bar.close()
        log = {
            "steps": len(losses),
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "heldout_perplexity": perplexity(model, heldout_ids, seqlen),
            "heldout_unigram_perplexity": unigram_perplexity(
                train_ids, heldout_ids, seqlen, len(tokenizer)
            ),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": train_ids.numel(),
            "threads": torch.get_num_threads(),
            "losses": losses,
        }
        log["seconds"] = round(time.perf_counter() - start, 2)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return log


def build_parser() -> argparse.ArgumentParser:
    """`python -m svnup demo corpus OUT` or `python -m svnup demo train CORPUS OUT [--steps N]`."""
    parser = argparse.ArgumentParser(
        prog="python -m svnup demo", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True, help="what to build")
    corpus = sub.add_parser(
        "corpus", help="write train.jsonl and heldout.jsonl", description="build the corpus"
    )
    corpus.add_argument("out", type=Path, help="folder to write the two files into")
    corpus.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of documents held out"
    )
    corpus.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    train = sub.add_parser(
        "train",
        help="train tokenizer and model on a corpus folder",
        description="train tokenizer and model on a corpus folder",
    )
    train.add_argument("corpus", type=Path, help="folder holding train.jsonl and heldout.jsonl")
    train.add_argument("out", type=Path, help="model folder to write (replaced only on success)")
    train.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    train.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    train.add_argument("--n-layers", type=int, default=8, help="decoder blocks")
    train.add_argument(
        "--max-seconds", type=float, default=None, help="stop training early after this long"
    )
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "corpus":
        result = build_corpus(args.out, args.heldout_fraction, args.seed)
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = train_demo_model(
            args.corpus,
            args.out,
            n_layers=args.n_layers,
            steps=args.steps,
            seed=args.seed,
            max_seconds=args.max_seconds,
        )
        result.pop("losses")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
