"""The offline demo model: deterministic corpus, a short real training run, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svnup import demo


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    demo.build_corpus(out)
    return out


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory) -> Path:
    """The first short documents of the real corpus, so a training run takes a second."""
    out = tmp_path_factory.mktemp("small-corpus")
    for name, n in (("train.jsonl", 200), ("heldout.jsonl", 20)):
        lines = [line for line in (corpus / name).open() if len(line) < 2000][:n]
        (out / name).write_text("".join(lines))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and the log must report the setting it ran with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(n_layers=2, hidden=32, heads=4, kv_heads=2, vocab_size=320, seqlen=32, batch_size=8)


@pytest.fixture(scope="module")
def tiny_run(small_corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return out, demo.train_demo_model(small_corpus, out, steps=20, **TINY)


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_and_seeded(corpus, tmp_path):
    counts = demo.build_corpus(tmp_path / "again")
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus / name).read_bytes()
    demo.build_corpus(tmp_path / "other", seed=1)
    assert _texts(tmp_path / "other" / "train.jsonl") != _texts(corpus / "train.jsonl")
    assert counts["train_docs"] == len(_texts(corpus / "train.jsonl"))


def test_corpus_split_is_disjoint_and_complete(corpus):
    train, heldout = _texts(corpus / "train.jsonl"), _texts(corpus / "heldout.jsonl")
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(demo.corpus_documents())
    assert len(heldout) == round(0.1 * (len(train) + len(heldout)))
    assert sum(map(len, train)) > 500_000  # enough text for a model that beats unigrams


def test_corpus_rejects_bad_fraction(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        demo.build_corpus(tmp_path, heldout_fraction=1.0)


def test_tokenizer_is_deterministic_and_prepends_bos(small_corpus):
    texts = _texts(small_corpus / "train.jsonl")
    a, b = demo.train_tokenizer(texts, 320), demo.train_tokenizer(texts, 320)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    ids = a("def f(x):\n    return x  # ünïcode")["input_ids"]
    assert ids[0] == a.bos_token_id and a.bos_token_id not in ids[1:]


def test_training_saves_loadable_float32_model(tiny_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, log = tiny_run
    assert not out.with_name(out.name + ".tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}

    text = "Return the value of the named attribute of object.\n\tTabs, ünïcode: 3.14"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    saved = json.loads((out / "train_log.json").read_text())
    assert saved == log and log["steps"] == 20 and len(log["losses"]) == 20
    assert log["threads"] == 1
    losses = log["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert 1 < log["heldout_perplexity"] < 2 * 320


def test_training_is_reproducible(tiny_run, small_corpus, tmp_path):
    _, log = tiny_run
    again = demo.train_demo_model(small_corpus, tmp_path / "m", steps=20, **TINY)
    assert again["losses"] == log["losses"]


def test_max_seconds_stops_early(small_corpus, tmp_path):
    log = demo.train_demo_model(small_corpus, tmp_path / "m", steps=1000, max_seconds=0, **TINY)
    assert log["steps"] == 1


def test_failed_training_leaves_no_output(small_corpus, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    out = tmp_path / "model"
    out.with_name("model.tmp").mkdir()  # a stale leftover of an earlier killed run
    monkeypatch.setattr(demo, "perplexity", boom)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        demo.train_demo_model(small_corpus, out, steps=2, **TINY)
    assert not out.exists() and not out.with_name("model.tmp").exists()


def test_training_rejects_bad_arguments(small_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="svnup demo corpus"):
        demo.train_demo_model(tmp_path / "nowhere", tmp_path / "m", steps=2, **TINY)
    with pytest.raises(ValueError, match="kv_heads"):
        demo.train_demo_model(small_corpus, tmp_path / "m", **{**TINY, "kv_heads": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        demo.train_demo_model(small_corpus, tmp_path / "m", **{**TINY, "vocab_size": 200})
    assert not (tmp_path / "m").exists()


def test_cli_builds_corpus(tmp_path, capsys):
    assert demo.main(["corpus", str(tmp_path / "c"), "--seed", "3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["heldout_docs"] == len(_texts(tmp_path / "c" / "heldout.jsonl"))


SHIPPED = Path(__file__).resolve().parents[1] / "demo"
SHIPPED_PYTHON = (3, 11, 7)  # the corpus's documentation comes from this Python (demo/README.md)


@pytest.mark.skipif(
    tuple(__import__("sys").version_info[:3]) != SHIPPED_PYTHON,
    reason="the shipped corpus holds Python 3.11.7's docstrings; other versions differ",
)
def test_shipped_corpus_is_what_the_recorded_command_writes(corpus):
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (SHIPPED / "corpus" / name).read_bytes() == (corpus / name).read_bytes(), name


def test_shipped_model_has_the_heldout_perplexity_of_its_log():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = json.loads((SHIPPED / "model/train_log.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / "model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "model", local_files_only=True)
    heldout = demo._token_stream(tokenizer, _texts(SHIPPED / "corpus/heldout.jsonl"))
    seqlen = model.config.max_position_embeddings
    assert model.config.num_hidden_layers == 8 and log["steps"] == 2000
    assert demo.perplexity(model, heldout, seqlen) == pytest.approx(log["heldout_perplexity"])
