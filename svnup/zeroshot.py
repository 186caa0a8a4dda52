"""Zero-shot accuracy through lm-evaluation-harness, and local multiple-choice tasks.

Pruning papers (Wanda, OWL, DLP, ATP, AlphaPruning) report WikiText-2 perplexity next to the mean
zero-shot accuracy of seven lm-evaluation-harness tasks. This module runs the harness as a
library on a model already in memory (``HFLM(pretrained=model)`` with ``simple_evaluate``), so a
pruned checkpoint is scored exactly as the harness scores any Hugging Face model. The harness is
an optional dependency (``pip install -e '.[zeroshot]'``); nothing here imports it until a task
runs.

Standard task names (``boolq``, ``arc_easy``, ...) download their datasets from the hub. A task
of one's own is a YAML file in a folder passed as ``include_path``; ``write_choice_task`` writes
one with its data beside it, and ``continuation_docs`` builds such a task from any text: given a
passage, pick its true next sentence among sentences drawn from other passages. Tasks read from
local files never touch the network.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

HARNESS = "lm_eval"
INSTALL_HINT = "pip install -e '.[zeroshot]' (lm-evaluation-harness with its hf extra)"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 4
DISTRACTOR_POOL = 8  # candidates drawn per distractor; the closest in length are kept


def harness_version() -> str | None:
    """The installed lm-evaluation-harness version, or None."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def check_harness() -> str:
    """The harness version; a one-line error naming the install command when it is missing."""
    version = harness_version()
    if version is None:
        raise ValueError(f"zero-shot evaluation needs lm-evaluation-harness: {INSTALL_HINT}")
    return version


def spec(settings: dict) -> dict | None:
    """What a zero-shot result depends on besides the checkpoint (None when none is asked for).

    The batch size is a runtime setting: log-likelihoods do not depend on it beyond float noise.
    """
    zero_shot = settings["evaluation"].get("zero_shot")
    if not zero_shot or not zero_shot.get("tasks"):
        return None
    return {
        "tasks": sorted(set(zero_shot["tasks"])),
        "limit": zero_shot.get("limit"),
        "include_path": zero_shot.get("include_path"),
        "num_fewshot": 0,
    }


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """A harness TaskManager that knows every task in ``tasks``; one-line error for unknown ones.

    When the include path defines all of them, the harness's own task index (some seconds to
    build) is left out.
    """
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(
                f"zero-shot include_path {str(include_path)!r} is not a directory of task YAMLs"
            )
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        where = "lm-evaluation-harness" + (f" or {include_path}" if include_path else "")
        raise ValueError(
            f"unknown zero-shot task(s) {', '.join(unknown)}: not a task of {where}; "
            "check evaluation.zero_shot.tasks"
        )
    return manager


def _index(include_path: str | None) -> list[str]:
    """The harness's task names: its own (``include_path`` None) or only those of a folder."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return sorted(TaskManager().all_tasks)
    return sorted(TaskManager(include_path=include_path, include_defaults=False).all_tasks)


def known_tasks(include_path: str | Path | None = None) -> frozenset[str]:
    """Every task, group and tag name of the harness (``include_path`` None) or of a folder of
    task YAMLs. Building the harness's index reads thousands of YAML files (a minute on a slow
    machine), so each index is kept in svnup's cache, keyed by the harness version and where it
    is installed, and by the folder's content fingerprint; a damaged entry is built again."""
    import importlib.util

    from svnup.content import fingerprint
    from svnup.data import svnup_cache
    from svnup.io import write_json

    harness = importlib.util.find_spec(HARNESS)
    identity = {
        "harness": check_harness(),
        "location": harness.origin if harness else None,
        "include_path": None if include_path is None else fingerprint(include_path),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cached = svnup_cache().expanduser() / f"lm-eval-tasks-{digest}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return frozenset(json.loads(cached.read_text())["tasks"])
    names = _index(None if include_path is None else str(include_path))
    write_json(cached, {**identity, "tasks": names})
    return frozenset(names)


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """A one-line ValueError naming every task that neither ``include_path`` nor the harness
    defines, with the closest known name. The harness's own index is read only for names the
    include path lacks."""
    missing = set(tasks)
    if include_path is not None:
        missing -= known_tasks(include_path)
    if not missing:
        return
    known = known_tasks()
    unknown = sorted(missing - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        where = f"lm-evaluation-harness {check_harness()}"
        where += f" or of {include_path}" if include_path else ""
        raise ValueError(
            f"unknown zero-shot task(s) {', '.join(hints)}: not a task of {where}; "
            "check the names in evaluation.zero_shot.tasks"
        )


@contextlib.contextmanager
def _no_download_counts() -> Iterator[None]:
    """``datasets`` pings a download counter whenever it builds a packaged loader (json), even for
    a local file; keep a local task entirely offline."""
    import datasets

    before = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = before


def _metrics(entry: dict) -> dict:
    """``{"acc,none": x, "acc_stderr,none": y, ...}`` -> ``{"acc": x, "acc_stderr": y, ...}``."""
    found = {}
    for name, value in entry.items():
        metric, _, filter_name = name.partition(",")
        if not filter_name or not isinstance(value, int | float):
            continue
        found[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
    return found


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def zero_shot_accuracy(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    manager=None,
) -> dict:
    """Zero-shot scores of a Hugging Face causal LM on harness tasks, and their means.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", ..., "samples"}},
    "mean_acc", "mean_acc_norm", "harness", "limit"}``; the means run over the tasks that report
    the metric. ``limit`` caps the documents per task (the harness's meaning: a fraction below 1).
    ``manager``: a ``task_manager(tasks, include_path)`` built beforehand (to fail before loading
    a model).
    """
    version = check_harness()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _no_download_counts():
        output = simple_evaluate(
            lm,
            tasks=list(tasks),
            task_manager=manager,
            num_fewshot=0,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
        )
    per_task = {}
    for name in sorted(output["configs"]):  # the leaf tasks (groups expand into these)
        per_task[name] = {
            **_metrics(output["results"][name]),
            "samples": int(output["n-samples"][name]["effective"]),
        }
    return {
        "tasks": per_task,
        "mean_acc": _mean([t["acc"] for t in per_task.values() if "acc" in t]),
        "mean_acc_norm": _mean([t["acc_norm"] for t in per_task.values() if "acc_norm" in t]),
        "harness": version,
        "limit": limit,
    }


# --- local multiple-choice tasks ------------------------------------------------------------


def write_choice_task(
    folder: str | Path, name: str, docs: Sequence[dict], final_folder: str | Path | None = None
) -> Path:
    """Write task ``name`` (``name.yaml`` and its data ``name.jsonl``) into ``folder``.

    Each doc is ``{"context": str, "choices": [str, ...], "label": int}``; the harness scores
    each choice as the continuation of the context after one space (acc, and acc_norm with the
    log-likelihood divided by the choice's length in characters). The YAML names its data file
    by absolute path, inside ``final_folder`` where ``folder`` is a temporary directory that
    will be moved there. Returns the YAML's path.
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    location = Path(final_folder or folder).resolve() / data.name
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(location)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True}
            for metric in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def _sentences(text: str, max_bytes: int) -> list[str]:
    """Sentences of a passage that read as prose: enough words, at most ``max_bytes`` of UTF-8
    (a byte-level tokenizer never makes more tokens than that, so a choice fits a short model).
    """
    found = []
    for sentence in SENTENCE_END.split(" ".join(text.split())):
        if len(sentence.split()) >= MIN_SENTENCE_WORDS and len(sentence.encode()) <= max_bytes:
            found.append(sentence)
    return found


def continuation_docs(
    texts: Sequence[str],
    n_docs: int,
    n_choices: int = 4,
    seed: int = 0,
    context_sentences: int = 3,
    max_sentence_bytes: int = 300,
) -> list[dict]:
    """Pick-the-true-continuation documents from passages of text.

    For a passage with at least two sentences, the context is up to ``context_sentences``
    sentences and the true choice the sentence after them; the distractors are sentences of
    other passages, the closest in length to the true one among a seeded random draw (so that
    length alone does not give the answer away). The label's position is drawn at random.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices={n_choices}: a multiple-choice task needs at least 2")
    rng = random.Random(seed)
    passages = [s for s in (_sentences(t, max_sentence_bytes) for t in texts) if s]
    pool = [(index, s) for index, sentences in enumerate(passages) for s in sentences]
    usable = [index for index, sentences in enumerate(passages) if len(sentences) >= 2]
    if len(usable) < n_docs:
        raise ValueError(
            f"only {len(usable)} passages have two usable sentences; ask for at most that many"
        )
    docs = []
    for index in sorted(rng.sample(usable, n_docs)):
        sentences = passages[index]
        answer_at = rng.randrange(1, len(sentences))
        answer = sentences[answer_at]
        context = " ".join(sentences[max(0, answer_at - context_sentences) : answer_at])
        drawn = rng.sample(pool, min(len(pool), DISTRACTOR_POOL * n_choices))
        others = list(dict.fromkeys(s for i, s in drawn if i != index and s not in sentences))
        distractors = sorted(others, key=lambda s: abs(len(s) - len(answer)))[: n_choices - 1]
        if len(distractors) < n_choices - 1:
            raise ValueError("too little text to draw distractors from; give more passages")
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    return docs
