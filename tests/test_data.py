"""Join protocols, c4 truncation, the token cache, calibration windows and source errors."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4, PTB, STORIES, WIKITEXT, needs_shared

from svnup.data import (
    calibration_samples,
    check_hub,
    check_source,
    eval_protocol,
    eval_stream,
    load_texts,
    resolve_protocol,
)

BOS = 1


class CharTokenizer:
    """One token per character after a BOS, so token ids spell back the exact text tokenised."""

    def __init__(self, name: str = "char", size: int = 0x110000):
        self.name_or_path = name
        self.size = size
        self.calls = 0

    def __len__(self) -> int:
        return self.size

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(32, 128)} | {"<size>": self.size}

    def __call__(self, text: str, return_tensors: str = "pt"):
        assert return_tensors == "pt"
        self.calls += 1
        return type("Encoding", (), {"input_ids": torch.tensor([encode(text)])})


def encode(text: str) -> list[int]:
    return [BOS] + [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def write_jsonl(path: Path, rows: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = ["", " = Title = \n", "", " First line .\n", " Second line .\n"]


def test_wikitext_rows_join_with_blank_lines(tmp_path):
    source = write_jsonl(tmp_path / "wikitext-2-raw-v1" / "test.jsonl", ROWS)
    tok = CharTokenizer()
    ids = eval_stream(tok, source, "test", seqlen=8, cache_dir=tmp_path / "cache")
    assert eval_protocol(source) == "wikitext2"
    assert ids.dtype == torch.long and ids.shape == (1, len(encode("\n\n".join(ROWS))))
    assert ids[0].tolist() == encode("\n\n".join(ROWS))  # one call, so one BOS
    assert tok.calls == 1


def test_directory_source_picks_the_split_file(tmp_path):
    directory = tmp_path / "wikitext-2-raw-v1"
    write_jsonl(directory / "test.jsonl", ["test row"])
    write_jsonl(directory / "validation.jsonl", ["validation row"])
    assert load_texts(str(directory), "test") == ["test row"]
    assert load_texts(str(directory), "valid") == ["validation row"]
    assert eval_protocol(str(directory)) == "wikitext2"
    ids = eval_stream(CharTokenizer(), str(directory), "validation", cache_dir=tmp_path / "c")
    assert decode(ids[0, 1:]) == "validation row"


def test_ptb_sentences_are_stripped_and_joined_with_spaces(tmp_path):
    directory = tmp_path / "ptb"
    directory.mkdir()
    (directory / "ptb.test.txt").write_text(" no it was n't \n the dow fell \n", encoding="utf-8")
    (directory / "ptb.valid.txt").write_text(" other \n", encoding="utf-8")
    assert eval_protocol(str(directory)) == "ptb"
    assert load_texts(str(directory), "test") == [" no it was n't ", " the dow fell "]
    ids = eval_stream(CharTokenizer(), str(directory), "test", cache_dir=tmp_path / "c")
    assert ids[0].tolist() == encode("no it was n't the dow fell")


def test_plain_txt_rows_join_with_blank_lines(tmp_path):
    source = tmp_path / "corpus" / "notes.txt"
    source.parent.mkdir()
    source.write_text("alpha\nbeta\r\ngamma", encoding="utf-8")
    assert eval_protocol(str(source)) == "plain"
    assert load_texts(str(source), "test") == ["alpha", "beta", "gamma"]
    ids = eval_stream(CharTokenizer(), str(source), cache_dir=tmp_path / "c")
    assert ids[0].tolist() == encode("alpha\n\nbeta\n\ngamma")


def test_given_protocol_wins_over_the_name(tmp_path):
    """A PTB file under a plain name reads as plain text unless its protocol is given; a hub name
    is only read with its own protocol."""
    source = tmp_path / "mydata" / "test.txt"
    source.parent.mkdir()
    source.write_text(" no it was n't \n the dow fell \n", encoding="utf-8")
    tok, cache = CharTokenizer(), tmp_path / "c"
    assert eval_stream(tok, str(source), cache_dir=cache)[0].tolist() == encode(
        " no it was n't \n\n the dow fell "
    )
    ids = eval_stream(tok, str(source), cache_dir=cache, protocol="ptb")
    assert ids[0].tolist() == encode("no it was n't the dow fell")
    assert resolve_protocol(str(source)) == "plain"
    assert resolve_protocol(str(source), "ptb") == "ptb"
    with pytest.raises(ValueError, match="hub dataset c4 is read with protocol c4, not plain"):
        resolve_protocol("c4", "plain")
    with pytest.raises(ValueError, match="protocol 'penn' is not one of"):
        resolve_protocol(str(source), "penn")


def test_given_protocol_makes_calibration_one_stream(tmp_path):
    """A stream protocol (ptb) joins the rows into one document to draw windows from; plain text
    draws a document per sample and skips those shorter than seqlen."""
    rows = ["ab", "cd", "ef", "gh"]
    source = write_jsonl(tmp_path / "mydata" / "train.jsonl", rows)
    with pytest.raises(ValueError, match="found 0 of 2 documents longer than seqlen=4"):
        calibration_samples(CharTokenizer(), source, nsamples=2, seqlen=4, seed=0)
    ids = calibration_samples(CharTokenizer(), source, nsamples=2, seqlen=4, seed=0, protocol="ptb")
    stream = encode("ab cd ef gh")
    for row in ids.tolist():
        assert any(stream[j : j + 4] == row for j in range(len(stream) - 3)), row


def c4_file(tmp_path: Path, docs: int) -> str:
    return write_jsonl(tmp_path / "c4" / "c4-validation.jsonl", [f"doc{i}" for i in range(docs)])


def test_c4_joins_the_first_1100_documents(tmp_path):
    source = c4_file(tmp_path, 1200)
    assert eval_protocol(source) == "c4"
    ids = eval_stream(CharTokenizer(), source, "validation", seqlen=100, cache_dir=tmp_path / "c")
    assert ids[0].tolist() == encode(" ".join(f"doc{i}" for i in range(1100)))


def test_c4_stream_is_cut_to_256_windows(tmp_path):
    source = c4_file(tmp_path, 1200)
    ids = eval_stream(CharTokenizer(), source, "validation", seqlen=4, cache_dir=tmp_path / "c")
    assert ids.shape == (1, 256 * 4)
    assert ids[0].tolist() == encode(" ".join(f"doc{i}" for i in range(1100)))[: 256 * 4]


def test_cache_skips_tokenising_and_is_written_atomically(tmp_path):
    source = write_jsonl(tmp_path / "wikitext" / "test.jsonl", ROWS)
    cache = tmp_path / "cache"
    tok = CharTokenizer()
    first = eval_stream(tok, source, cache_dir=cache)
    second = eval_stream(tok, source, seqlen=16, cache_dir=cache)  # seqlen is not in the key
    assert tok.calls == 1
    assert torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", [b"not a torch file", b""])
def test_damaged_cache_is_named_in_the_log_and_rebuilt(tmp_path, caplog, damage):
    source = write_jsonl(tmp_path / "wikitext" / "test.jsonl", ROWS)
    cache = tmp_path / "cache"
    tok = CharTokenizer()
    first = eval_stream(tok, source, cache_dir=cache)
    (cached,) = cache.iterdir()
    cached.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="svnup"):
        again = eval_stream(tok, source, cache_dir=cache)
    assert torch.equal(first, again) and tok.calls == 2
    assert f"token cache {cached} is damaged" in caplog.text and "rebuild" in caplog.text
    assert torch.equal(torch.load(cached, weights_only=True), first)  # replaced, whole
    torch.save({"ids": first}, cached)  # readable, but not a token stream
    assert torch.equal(eval_stream(tok, source, cache_dir=cache), first) and tok.calls == 3


def test_cache_defaults_to_svnup_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVNUP_CACHE", str(tmp_path / "env-cache"))
    source = write_jsonl(tmp_path / "wikitext" / "test.jsonl", ROWS)
    eval_stream(CharTokenizer(), source)
    assert len(list((tmp_path / "env-cache").glob("wikitext2-test-*.pt"))) == 1


def test_cache_is_invalidated_by_file_tokenizer_and_c4_seqlen(tmp_path):
    source = write_jsonl(tmp_path / "wikitext" / "test.jsonl", ["one"])
    cache = tmp_path / "cache"
    tok = CharTokenizer()
    eval_stream(tok, source, cache_dir=cache)
    write_jsonl(Path(source), ["two"])
    os.utime(source, ns=(0, 10**9))  # same size: only the mtime tells the files apart
    assert decode(eval_stream(tok, source, cache_dir=cache)[0, 1:]) == "two"
    assert tok.calls == 2
    other = CharTokenizer(size=1000)
    eval_stream(other, source, cache_dir=cache)
    assert other.calls == 1

    c4 = c4_file(tmp_path, 1200)
    eval_stream(tok, c4, "validation", seqlen=4, cache_dir=cache)
    assert eval_stream(tok, c4, "validation", seqlen=8, cache_dir=cache).shape == (1, 256 * 8)
    assert tok.calls == 4


def test_calibration_windows_are_slices_of_long_documents(tmp_path):
    rng = random.Random(1)
    docs = ["".join(rng.choice("abcdefgh") for _ in range(n)) for n in (5, 40, 29, 12, 70, 31, 3)]
    source = write_jsonl(tmp_path / "corpus" / "train.jsonl", docs)
    tok = CharTokenizer()
    samples = calibration_samples(tok, source, nsamples=16, seqlen=30, seed=3)
    assert samples.shape == (16, 30) and samples.dtype == torch.long
    long_docs = [decode(encode(d)) for d in docs if len(encode(d)) > 30]
    for sample in samples.tolist():
        assert any(decode(sample) in doc for doc in long_docs)
    again = calibration_samples(CharTokenizer(), source, nsamples=16, seqlen=30, seed=3)
    assert torch.equal(samples, again)
    other_seed = calibration_samples(CharTokenizer(), source, nsamples=16, seqlen=30, seed=4)
    assert not torch.equal(samples, other_seed)


def test_calibration_on_a_stream_matches_the_sparsegpt_draws(tmp_path):
    rows = [f" row {i} of the training split .\n" for i in range(40)]
    source = write_jsonl(tmp_path / "wikitext-2-raw-v1" / "train.jsonl", rows)
    tok = CharTokenizer()
    samples = calibration_samples(tok, source, nsamples=4, seqlen=50, seed=7)
    stream = encode(" ".join(rows))
    rng = random.Random(7)
    starts = [rng.randint(0, len(stream) - 50 - 1) for _ in range(4)]
    assert samples.tolist() == [stream[s : s + 50] for s in starts]
    assert tok.calls == 1  # the stream is tokenised once, not once per draw


def test_calibration_fails_when_no_document_is_long_enough(tmp_path):
    exactly_seqlen = "x" * 63  # 64 tokens with the BOS: not *more* than seqlen
    source = write_jsonl(tmp_path / "corpus" / "train.jsonl", ["tiny", exactly_seqlen])
    with pytest.raises(ValueError, match=r"seqlen=64.*train\.jsonl"):
        calibration_samples(CharTokenizer(), source, nsamples=2, seqlen=64)
    with pytest.raises(ValueError, match="nsamples=0"):
        calibration_samples(CharTokenizer(), source, nsamples=0, seqlen=64)


def test_source_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"'wikitext'.*hub name \(wikitext2, ptb, c4\)"):
        load_texts("wikitext", "test")
    with pytest.raises(ValueError, match="'wikitext'"):
        eval_protocol("wikitext")
    with pytest.raises(ValueError, match="split='dev'"):
        load_texts("wikitext2", "dev")
    (tmp_path / "data.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_texts(str(tmp_path / "data.csv"), "test")
    write_jsonl(tmp_path / "rows" / "test.jsonl", ["a"])
    with pytest.raises(ValueError, match=r"split 'train'.*found: test\.jsonl"):
        load_texts(str(tmp_path / "rows"), "train")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl: line 1 has no 'text' field: give each"):
        load_texts(str(tmp_path / "bad.jsonl"), "test")
    with pytest.raises(ValueError, match="not available for c4"):
        load_texts("c4", "test")


def test_unreadable_rows_are_named_with_their_file_and_line(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first row\nsecond row\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt: line 3 is not UTF-8 text \(byte 0xe9\)"):
        load_texts(str(latin), "test")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3 column 14 is not valid JSON"):
        load_texts(str(rows), "test")
    rows.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 2 is not UTF-8 text.*iconv"):
        load_texts(str(rows), "test")
    rows.write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.jsonl: line 2 has no 'text' field"):
        load_texts(str(rows), "test")


def test_hub_names_load_the_papers_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["t"], "sentence": ["s"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("wikitext2", "test") == ["t"]
    assert load_texts("ptb", "valid") == ["s"]
    assert load_texts("c4", "validation") == ["t"]
    assert load_texts("c4", "train") == ["t"]
    assert calls == [
        (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (("ptb_text_only", "penn_treebank"), {"split": "validation"}),
        (
            ("allenai/c4",),
            {
                "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                "split": "validation",
            },
        ),
        (
            ("allenai/c4",),
            {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
        ),
    ]


def test_parquet_rows(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow is not installed, so .parquet cannot be read")
    import pandas as pd

    source = tmp_path / "corpus" / "test.parquet"
    source.parent.mkdir()
    pd.DataFrame({"text": ["a", "b c"], "id": [1, 2]}).to_parquet(source)
    assert load_texts(str(source), "test") == ["a", "b c"]
    assert load_texts(str(source.parent), "test") == ["a", "b c"]
    ids = eval_stream(CharTokenizer(), str(source), cache_dir=tmp_path / "c")
    assert ids[0].tolist() == encode("a\n\nb c")


@needs_shared(STORIES)
@needs_shared(WIKITEXT)
def test_wikitext2_test_stream_of_stories260k(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    ids = eval_stream(tok, str(WIKITEXT), "test", seqlen=512, cache_dir=tmp_path)
    assert ids.shape == (1, 815_070)  # T measured once; 1,591 windows as in ../shared/README.md
    assert ids.shape[1] // 512 == 1591
    assert ids[0, 0].item() == tok.bos_token_id


@needs_shared(PTB)
@needs_shared(C4)
def test_shared_fixture_protocols():
    assert eval_protocol(str(PTB)) == "ptb"
    assert eval_protocol(str(C4)) == "c4"
    assert len(load_texts(str(PTB), "validation")) == 3370
    assert len(load_texts(str(C4), "validation")) == 2000


def test_first_rows_of_local_sources_are_checked(tmp_path):
    check_source(write_jsonl(tmp_path / "ok.jsonl", ["a", "b"]), "test")
    bad = {
        "empty.jsonl": (b"\n  \n", "empty.jsonl has no rows"),
        "empty.txt": (b"", "empty.txt has no rows"),
        "body.jsonl": (b'{"body": "x"}\n', "body.jsonl line 1 has no 'text' string"),
        "null.jsonl": (b'{"text": "a"}\n{"text": null}\n', "null.jsonl line 2 has no 'text'"),
        "broken.jsonl": (b'{"text": "a"\n', "broken.jsonl line 1 is not JSON"),
        "latin1.txt": ("caf\u00e9\n".encode("latin-1"), "latin1.txt is not UTF-8 text"),
    }
    for name, (data, message) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            check_source(str(tmp_path / name), "test")
    folder = tmp_path / "split"
    (folder / "test.jsonl").parent.mkdir()
    (folder / "test.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="test.jsonl has no rows"):
        check_source(str(folder), "test")


def test_first_rows_of_parquet_sources_are_checked(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow is not installed, so .parquet cannot be read")
    import pandas as pd

    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "ok.parquet")
    check_source(str(tmp_path / "ok.parquet"), "test")
    pd.DataFrame({"body": ["a"]}).to_parquet(tmp_path / "body.parquet")
    with pytest.raises(ValueError, match="body.parquet has no 'text' column"):
        check_source(str(tmp_path / "body.parquet"), "test")
    pd.DataFrame({"text": []}, dtype=str).to_parquet(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet has no rows"):
        check_source(str(tmp_path / "none.parquet"), "test")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet is not a readable parquet file"):
        check_source(str(tmp_path / "junk.parquet"), "test")


def _cache_wikitext_test_split(cache: Path, rows: list[str], scratch: Path) -> None:
    """Lay ``rows`` out in ``cache`` as a load of WikiText-2's test split leaves them:
    wikitext/wikitext-2-raw-v1/<version>/<hash>/ with the arrow file and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    builder = Json(
        cache_dir=str(scratch),
        dataset_name="wikitext",
        config_name="wikitext-2-raw-v1",
        data_files={"test": write_jsonl(scratch / "rows.jsonl", rows)},
    )
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    target = cache / "wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "0123abcd"
    shutil.copytree(prepared, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(
        json.dumps({**info, "config_name": "wikitext-2-raw-v1"})
    )


def test_hub_dataset_is_found_in_the_local_cache_as_datasets_finds_it_offline(
    tmp_path, monkeypatch
):
    pytest.importorskip("datasets")
    cache = tmp_path / "hf" / "datasets"
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    with pytest.raises(ValueError, match=r"wikitext2 \(test split\) is not in the Hugging Face"):
        check_hub("wikitext2", "test")
    _cache_wikitext_test_split(cache, ["first row", "second row"], tmp_path / "scratch")
    check_hub("wikitext2", "test")
    with pytest.raises(ValueError, match="offline mode is on.*run once online"):
        check_hub("wikitext2", "validation")  # only the test split was cached
    # What the check accepts is what datasets loads offline (it reads the flags at import).
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "from svnup.data import load_texts; print(load_texts('wikitext2', 'test'))",
        ],
        env={**os.environ, **offline},
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "['first row', 'second row']"


def test_hub_that_does_not_answer_is_one_line(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a local port that nobody listens on: no network is touched
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with pytest.raises(ValueError, match=r"c4 \(validation split\).*did not answer in 3 s"):
        check_hub("c4", "validation")


def test_a_saved_copy_of_a_tokenizer_shares_its_cache_and_another_tokenizer_does_not(tmp_path):
    """A pruned checkpoint saves the tokenizer into its own folder: evaluating it must not
    tokenise the dataset again, while a tokenizer that splits text differently must."""
    from transformers import AutoTokenizer

    from svnup.demo import train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park"] * 20
    source = write_jsonl(tmp_path / "wikitext" / "test.jsonl", texts)
    cache = tmp_path / "cache"
    for name, vocab in [("model", 300), ("pruned", 300), ("other", 280)]:
        train_tokenizer(texts, vocab).save_pretrained(tmp_path / name)
    model, pruned, other = (
        AutoTokenizer.from_pretrained(tmp_path / n) for n in ("model", "pruned", "other")
    )
    ids = eval_stream(model, source, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    assert torch.equal(eval_stream(pruned, source, cache_dir=cache), ids)
    assert len(list(cache.iterdir())) == 1  # the copy in another folder read the same file
    assert not torch.equal(eval_stream(other, source, cache_dir=cache), ids)
    assert len(list(cache.iterdir())) == 2
