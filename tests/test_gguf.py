"""GGUF model entries: finding the file (a path or a package's), its content key, the checks before
planning from its metadata, and the conversion through transformers' GGUF loading."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import pytest
import torch
from conftest import SHARED, build_tiny_llama, needs_shared, random_ids, write_tiny_gguf

from svnup import config as cfg
from svnup import gguf_files, preflight, stages
from svnup.config import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed"
)
SMOLLM = SHARED / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TO_HF = SHARED / "tools" / "gguf_to_hf.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaMA with a trained byte-level BPE tokenizer, and the same model as a GGUF file."""
    from svnup.demo import train_tokenizer

    root = tmp_path_factory.mktemp("tiny-gguf")
    texts = [f"the quick brown fox jumps over {i} lazy dogs, again and again" for i in range(300)]
    tokenizer = train_tokenizer(texts, 320)
    hf = build_tiny_llama(
        root / "hf",
        layers=3,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(hf)
    return hf, write_tiny_gguf(hf, root / "tiny.gguf")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh project folder as the working directory, with an empty memo of GGUF files and a
    local dataset (the checks before planning would ask the hub about a hub name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.jsonl").write_text('{"text": "the quick brown fox"}\n')
    gguf_files._remembered.cache_clear()
    return tmp_path


def install_fake_distribution(site: Path, file: Path, package: str = "tinymodels") -> str:
    """Install a distribution ``<package>-dist`` into ``site`` that ships ``file`` inside its
    package, as pip would (a RECORD of its files); return the package: path naming the file."""
    (site / package).mkdir(parents=True)
    shutil.copy(file, site / package / file.name)
    info = site / f"{package}_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}-dist\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{package}\n")
    record = [f"{package}/{file.name},,", f"{package}/__init__.py,,", f"{info.name}/RECORD,,"]
    (site / package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (info / "RECORD").write_text("\n".join(record) + "\n")
    importlib.invalidate_caches()
    return f"package:{package}/{file.name}"


def test_package_path_resolves_through_the_installed_record(tiny, tmp_path, monkeypatch):
    _, file = tiny
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = install_fake_distribution(tmp_path / "site", file)
    gguf_files._package_file.cache_clear()
    scans = []
    real = gguf_files.metadata.packages_distributions
    monkeypatch.setattr(
        gguf_files.metadata, "packages_distributions", lambda: scans.append(1) or real()
    )
    found = gguf_files.locate(path)
    assert found == (tmp_path / "site" / "tinymodels" / file.name).resolve()
    assert gguf_files.locate(path) == found and len(scans) == 1, "planning asks once a process"
    assert "tinymodels" not in sys.modules  # found without importing the package
    assert gguf_files.is_gguf(path) and gguf_files.is_gguf(str(file))
    assert not gguf_files.is_gguf("tiny") and not gguf_files.is_gguf("org/model")
    with pytest.raises(ValueError, match="no installed distribution provides the package nosuch"):
        gguf_files.locate("package:nosuch/model.gguf")
    with pytest.raises(ValueError, match="installs no file tinymodels/other.gguf"):
        gguf_files.locate("package:tinymodels/other.gguf")
    with pytest.raises(ValueError, match="names no file inside a package"):
        gguf_files.locate("package:tinymodels")
    with pytest.raises(ValueError, match="does not exist"):
        gguf_files.locate(str(tmp_path / "missing.gguf"))


def test_digest_is_computed_once_and_remembered_across_processes(tiny, project, monkeypatch):
    _, source = tiny
    file = project / "copy.gguf"
    shutil.copy(source, file)
    calls = []
    real = gguf_files._sha256
    monkeypatch.setattr(gguf_files, "_sha256", lambda f: calls.append(f) or real(f))
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    assert gguf_files.digest(file) == expected
    gguf_files._remembered.cache_clear()  # a new process: only the index on disk remembers
    assert gguf_files.digest(file) == expected and len(calls) == 1
    assert json.loads(Path(gguf_files.INDEX).read_text())[str(file)]["sha256"] == expected
    os.utime(file, ns=(1, 1))  # a changed modification time: hashed again
    assert gguf_files.digest(file) == expected and len(calls) == 2
    Path(gguf_files.INDEX).write_text("{not json")  # a damaged memo costs only the work again
    gguf_files._remembered.cache_clear()
    assert gguf_files.digest(file) == expected and len(calls) == 3


def gguf_settings(path: str, **entry) -> dict:
    config = {
        "models": {"g": {"path": path, "seqlen": 32, **entry}},
        "calibration": {"dataset": "text.jsonl", "nsamples": 4, "seed": 0},
        "shapley": {
            "estimator": "loo",
            "window": 2,
            "stride": 1,
            "n_permutations": 2,
            "eval_samples": 2,
            "ablation": "prune",
            "probe_sparsity": 0.5,
            "probe_pruner": "wanda",
            "value": "neg_nll",
            "targets": "text",
        },
        "allocation": {"method": "uniform", "min": 0.0, "max": 0.99},
        "pruner": "wanda",
        "evaluation": {"datasets": ["text.jsonl"], "split": "test"},
        "targets": {
            "models": ["g"],
            "sparsities": [0.5],
            "allocations": ["uniform"],
            "pruners": ["wanda"],
        },
    }
    cfg.validate(config)
    return cfg.model_settings(config, "g")


def test_model_spec_names_the_conversion_keyed_by_content(tiny, project):
    _, source = tiny
    moved = project / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copy(source, moved)
    spec = cfg.model_spec(gguf_settings(str(source)))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert spec == {"path": f"results/gguf/{cfg.key({'gguf': sha})}", "dtype": "float32"}
    assert cfg.model_spec(gguf_settings(str(moved))) == spec  # same bytes, same results
    with open(moved, "ab") as handle:
        handle.write(b"\0" * 32)
    assert cfg.model_spec(gguf_settings(str(moved)))["path"] != spec["path"]
    calibration = cfg.calibration_spec(gguf_settings(str(source)))
    assert calibration["model"] == spec


def test_checks_before_planning_read_the_metadata_without_converting(tiny, project):
    _, file = tiny
    facts = preflight.check_model(gguf_settings(str(file)), "g")
    assert facts == preflight.ModelFacts(n_blocks=3, context=256, model_type="llama")
    assert cfg.n_blocks(gguf_settings(str(file))) == 3
    assert not Path(cfg.GGUF_FOLDER, "logs").exists()
    assert [p.name for p in Path(cfg.GGUF_FOLDER).iterdir()] == ["files.json"]
    with pytest.raises(ConfigError, match=r"models.g.seqlen': 300 exceeds .* 256"):
        preflight.check_model(gguf_settings(str(file), seqlen=300), "g")
    wide = gguf_settings(str(file), shapley={"estimator": "swsv", "window": 4})
    with pytest.raises(ConfigError, match="window 4 exceeds the model's 3 blocks"):
        preflight.check_model(wide, "g")
    with pytest.raises(ConfigError, match=r"^config key 'models.g.path': GGUF file .* not exist"):
        preflight.check_model(gguf_settings(str(project / "gone.gguf")), "g")
    with pytest.raises(ConfigError, match="no installed distribution provides the package nosuch"):
        preflight.check_model(gguf_settings("package:nosuch/x.gguf"), "g")
    broken = project / "broken.gguf"
    for size in (1000, file.stat().st_size - 100):  # cut in the metadata, in the weights
        broken.write_bytes(file.read_bytes()[:size])
        with pytest.raises(ConfigError, match=r"^config key 'models.g.path': .* not a whole GGUF"):
            preflight.check_model(gguf_settings(str(broken)), "g")


def test_the_family_check_reads_the_model_type_from_the_metadata(project):
    """A GGUF file of an architecture svnup has no family for is refused before planning, from
    its metadata alone (this file has no tensors at all)."""
    import gguf

    file = project / "bloom.gguf"
    writer = gguf.GGUFWriter(str(file), "bloom")
    writer.add_name("bloom-560m")
    writer.add_block_count(24)
    writer.add_context_length(2048)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"bloom.gguf is a 'bloom' model, a family svnup"):
        preflight.check_model(gguf_settings(str(file)), "g")
    assert gguf_files.model_type("llama", "Mistral-7B-Instruct-v0.3") == "mistral"
    assert gguf_files.model_type("gemma3", "gemma-3-1b-it") == "gemma3_text"
    assert gguf_files.model_type("qwen2", "Qwen2.5-0.5B") == "qwen2"


def test_an_entry_naming_a_missing_package_fails_only_when_asked_for(project):
    """Planning another model never resolves the GGUF entry (config.yaml names a package that
    most installations lack)."""
    settings = gguf_settings("package:nosuch/x.gguf")
    assert settings["path"] == "package:nosuch/x.gguf"


def test_conversion_reproduces_the_model_and_tokenizer(tiny, project):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, file = tiny
    out = project / "converted"
    stages.convert(file, out)
    record = json.loads((out / "conversion.json").read_text())
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["versions"]["gguf"]
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    original = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(original.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits)
    text = "the lazy fox jumps over 12 quick dogs"
    expected = AutoTokenizer.from_pretrained(hf)(text).input_ids
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == expected
    assert not list(project.glob(".converted*")), "no temporary folder is left"


def test_a_failed_conversion_leaves_no_folder(project):
    bad = project / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises
        stages.convert(bad, project / "converted")
    assert not (project / "converted").exists()
    assert not list(project.glob(".converted*"))


@needs_shared(SMOLLM)
@pytest.mark.shared
@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="../shared/tools/gguf_to_hf.py needs accelerate (pip install accelerate)",
)
def test_smollm2_conversion_matches_the_shared_tool(tmp_path):
    """svnup's conversion of the shared SmolLM2 GGUF gives the logits of the reference tool's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = tmp_path / "tool"
    subprocess.run(
        [sys.executable, str(GGUF_TO_HF), str(SMOLLM), str(reference)],
        check=True,
        capture_output=True,
    )
    with chdir(tmp_path):
        gguf_files._remembered.cache_clear()
        stages.convert(SMOLLM, tmp_path / "svnup")
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    tokens = AutoTokenizer.from_pretrained(reference)(text).input_ids
    assert AutoTokenizer.from_pretrained(tmp_path / "svnup")(text).input_ids == tokens
    ids = torch.cat([torch.tensor([tokens]), random_ids(49152, n=3, seqlen=len(tokens))])
    logits = []
    for folder in (reference, tmp_path / "svnup"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert model.config.num_hidden_layers == 30
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
