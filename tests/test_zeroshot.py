"""Zero-shot accuracy through lm-evaluation-harness on a local task, checked by hand.

Why: the harness is the reference every pruning paper reports, so svnup must hand it the pruned
model unchanged and read its numbers back correctly. The test writes its own multiple-choice
task (CI cannot download), scores every choice itself with the model's full forward, and
requires the harness's acc / acc_norm to equal the argmax accuracies of those log-likelihoods,
with no network access at all.
"""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_llama

from svnup import demo, stages, zeroshot
from svnup.io import read_json, write_json

pytest.importorskip("lm_eval", reason=zeroshot.INSTALL_HINT)

N_DOCS = 12
N_RIGHT = 7  # documents relabelled so that argmax picks the label


@pytest.fixture(scope="module")
def passages() -> list[str]:
    return demo.corpus_documents()[:300]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, passages) -> Path:
    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = demo.train_tokenizer(passages[:100], 320)
    build_tiny_llama(
        folder,
        layers=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def choice_loglikelihoods(model, tokenizer, doc: dict) -> list[float]:
    """log p(" " + choice | context) summed over the choice's tokens, one full forward each."""
    context = tokenizer(doc["context"])["input_ids"]
    scores = []
    for choice in doc["choices"]:
        ids = tokenizer(doc["context"] + " " + choice)["input_ids"]
        assert ids[: len(context)] == context  # the choice's tokens start after the context's
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        scores.append(
            float(logprobs[torch.arange(len(ids) - 1), targets][len(context) - 1 :].sum())
        )
    return scores


def argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


@pytest.fixture(scope="module")
def task(tmp_path_factory, passages, lm) -> tuple[Path, list[dict], list[list[float]]]:
    """A local task whose labels make argmax right on the first N_RIGHT documents only."""
    docs = zeroshot.continuation_docs(passages, n_docs=N_DOCS, seed=0)
    scores = [choice_loglikelihoods(*lm, doc) for doc in docs]
    for index, (doc, lls) in enumerate(zip(docs, scores, strict=True)):
        best = argmax(lls)
        assert sorted(lls)[-1] - sorted(lls)[-2] > 1e-3, "a near tie would make argmax fragile"
        doc["label"] = best if index < N_RIGHT else (best + 1) % len(lls)
    folder = tmp_path_factory.mktemp("tasks")
    zeroshot.write_choice_task(folder, "toy_continuation", docs)
    return folder, docs, scores


def hand_accuracy(docs, scores, normalise: bool) -> float:
    right = 0
    for doc, lls in zip(docs, scores, strict=True):
        if normalise:
            lls = [ll / len(choice) for ll, choice in zip(lls, doc["choices"], strict=True)]
        right += argmax(lls) == doc["label"]
    return right / len(docs)


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Every connection or name lookup the code under test tries; each one fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is not allowed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_harness_accuracy_is_the_argmax_of_hand_computed_loglikelihoods(lm, task, network_attempts):
    folder, docs, scores = task
    result = zeroshot.zero_shot_accuracy(
        *lm, ["toy_continuation"], include_path=folder, batch_size=5
    )
    scored = result["tasks"]["toy_continuation"]
    assert scored["samples"] == N_DOCS
    assert scored["acc"] == pytest.approx(N_RIGHT / N_DOCS, abs=1e-12)
    assert scored["acc"] == pytest.approx(hand_accuracy(docs, scores, False), abs=1e-12)
    assert scored["acc_norm"] == pytest.approx(hand_accuracy(docs, scores, True), abs=1e-12)
    assert scored["acc_stderr"] > 0
    assert result["mean_acc"] == scored["acc"]
    assert result["mean_acc_norm"] == scored["acc_norm"]
    assert result["harness"] == zeroshot.harness_version()
    assert network_attempts == []


def test_limit_scores_the_first_documents(lm, task, network_attempts):
    folder, docs, scores = task
    result = zeroshot.zero_shot_accuracy(
        *lm, ["toy_continuation"], include_path=folder, limit=5, batch_size=2
    )
    scored = result["tasks"]["toy_continuation"]
    assert scored["samples"] == 5
    assert scored["acc"] == pytest.approx(hand_accuracy(docs[:5], scores[:5], False), abs=1e-12)
    assert result["limit"] == 5
    assert network_attempts == []


def test_standard_names_resolve_and_unknown_ones_are_a_one_line_error(task):
    folder, _, _ = task
    with pytest.raises(ValueError, match="unknown zero-shot task") as error:
        zeroshot.task_manager(["toy_continuation", "arc_easy", "no_such_task"], folder)
    message = str(error.value)
    assert "no_such_task" in message and "arc_easy" not in message and "\n" not in message


def test_missing_include_path_and_missing_harness_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="include_path"):
        zeroshot.task_manager(["toy"], tmp_path / "absent")
    monkeypatch.setattr(zeroshot, "harness_version", lambda: None)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[zeroshot\]'"):
        zeroshot.check_harness()


def test_written_task_is_a_harness_multiple_choice_task(task):
    folder, docs, _ = task
    config = yaml.safe_load((folder / "toy_continuation.yaml").read_text())
    assert config["output_type"] == "multiple_choice"
    assert {m["metric"] for m in config["metric_list"]} == {"acc", "acc_norm"}
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert [json.loads(line) for line in data.read_text().splitlines()] == docs


def test_continuation_docs_pair_a_passage_with_its_next_sentence(passages):
    docs = zeroshot.continuation_docs(passages, n_docs=20, n_choices=4, seed=3)
    assert docs == zeroshot.continuation_docs(passages, n_docs=20, n_choices=4, seed=3)
    assert docs != zeroshot.continuation_docs(passages, n_docs=20, n_choices=4, seed=4)
    flat = [" ".join(p.split()) for p in passages]
    for doc in docs:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        answer = doc["choices"][doc["label"]]
        source = [p for p in flat if doc["context"] + " " + answer in p]
        assert source, "the true choice is the sentence right after the context"
        for index, choice in enumerate(doc["choices"]):
            if index != doc["label"]:
                assert not any(choice in p for p in source), "a distractor from the same passage"
    with pytest.raises(ValueError, match="at most"):
        zeroshot.continuation_docs(passages[:3], n_docs=10)


def test_stage_result_reaches_ppl_json_and_summary(model_dir, task, tmp_path):
    folder, _, _ = task
    spec = zeroshot.spec(
        {"evaluation": {"zero_shot": {"tasks": ["toy_continuation"], "include_path": str(folder)}}}
    )
    out = tmp_path / "results" / "zeroshot.json"
    runtime = {"device": "cpu", "batch_size": 4, "offload": "auto"}
    model = {"path": str(model_dir), "dtype": "float32"}
    stages.zeroshot(spec, runtime, model, str(model_dir), out)
    result = read_json(out)
    assert result["spec"] == spec
    assert result["tasks"]["toy_continuation"]["acc"] == pytest.approx(N_RIGHT / N_DOCS)

    evaluation = tmp_path / "eval.json"
    write_json(evaluation, {"dataset": "heldout", "ppl": 12.5})
    ppl = tmp_path / "results" / "dense" / "ppl.json"
    stages.collect("tiny", None, None, None, [evaluation], ppl, zero_shot=out)
    assert read_json(ppl)["zero_shot"]["mean_acc"] == result["mean_acc"]
    stages.summary([ppl], tmp_path / "summary.csv")
    (row,) = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert float(row["zero_shot_acc"]) == pytest.approx(N_RIGHT / N_DOCS)


def test_spec_keys_what_changes_the_numbers():
    def settings(**zero_shot):
        return {"evaluation": {"datasets": ["x"], "zero_shot": zero_shot}}

    assert zeroshot.spec({"evaluation": {"datasets": ["x"]}}) is None
    assert zeroshot.spec(settings(tasks=[])) is None
    base = zeroshot.spec(settings(tasks=["rte", "boolq"]))
    assert base == zeroshot.spec(settings(tasks=["boolq", "rte"], batch_size=64))
    assert base != zeroshot.spec(settings(tasks=["boolq", "rte"], limit=10))
    assert base != zeroshot.spec(settings(tasks=["boolq"]))


def test_task_stage_writes_a_task_folder_that_points_at_itself(tmp_path, passages):
    source = tmp_path / "passages.jsonl"
    source.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages[:80]))
    spec = {
        "source": str(source),
        "split": "test",
        "name": "mine",
        "n_docs": 10,
        "n_choices": 3,
        "seed": 0,
        "context_sentences": 2,
        "max_sentence_bytes": 200,
    }
    stages.zeroshot_task(spec, tmp_path / "tasks")
    config = yaml.safe_load((tmp_path / "tasks" / "mine.yaml").read_text())
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data == (tmp_path / "tasks" / "mine.jsonl").resolve() and data.is_file()
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(docs) == 10 and all(len(doc["choices"]) == 3 for doc in docs)
    assert max(len(c.encode()) for doc in docs for c in doc["choices"]) <= 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.jsonl", "tasks"]  # no tmp


def test_task_names_are_checked_against_a_cached_index(tmp_path, monkeypatch):
    """The harness's index is built once per harness version and folder content, then read from
    svnup's cache; a workflow-built folder's names come from the workflow, not an index."""
    monkeypatch.setenv("SVNUP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zeroshot, "check_harness", lambda: "0.4.test")
    built = []

    def index(include_path):
        built.append(include_path)
        return ["boolq", "arc_easy"] if include_path is None else ["toy_a"]

    monkeypatch.setattr(zeroshot, "_index", index)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "toy_a.yaml").write_text("task: toy_a\n")
    zeroshot.check_tasks(["toy_a"], str(folder))
    assert built == [str(folder)], "the harness's own index is read only for names left over"
    zeroshot.check_tasks(["toy_a", "boolq"], str(folder))
    zeroshot.check_tasks(["arc_easy"])
    assert built == [str(folder), None]
    with pytest.raises(ValueError) as error:
        zeroshot.check_tasks(["boolqq", "toy_a", "nothing_alike"], str(folder))
    assert str(error.value) == (
        "unknown zero-shot task(s) boolqq (did you mean boolq?), nothing_alike: not a task of "
        f"lm-evaluation-harness 0.4.test or of {folder}; check the names in "
        "evaluation.zero_shot.tasks"
    )
    assert built == [str(folder), None]
    (folder / "toy_b.yaml").write_text("task: toy_b\n")  # new content: the folder is indexed again
    zeroshot.check_tasks(["toy_a"], str(folder))
    assert built == [str(folder), None, str(folder)]
    for cached in (tmp_path / "cache").glob("lm-eval-tasks-*.json"):
        cached.write_text('{"tasks": ')  # damaged: only a cache, built again
    zeroshot.check_tasks(["boolq"])
    assert built == [str(folder), None, str(folder), None]
