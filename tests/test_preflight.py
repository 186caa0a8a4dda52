"""Content fingerprints, integrity checks and the checks that run before the first job."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
from conftest import build_tiny_llama
from workflow_fixture import tiny_config

from svnup import config as cfg
from svnup import content, preflight
from svnup.io import CorruptFileError, write_json
from svnup.stages import summary


def _settings(path, **shapley) -> dict:
    config = tiny_config(**{f"shapley.{key}": value for key, value in shapley.items()})
    config["models"]["tiny"]["path"] = str(path)
    return cfg.model_settings(cfg.validate(config), "tiny")


def test_fingerprint_follows_content_of_small_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    before = content.fingerprint(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "meta").write_text("anything")  # hidden: not content
    assert content.fingerprint(folder) == before
    (folder / "config.json").write_text('{"a": 2}')
    assert content.fingerprint(folder) != before
    (folder / "config.json").write_text('{"a": 1}')
    os.utime(folder / "config.json", (1, 1))  # restored content, another time: same key
    assert content.fingerprint(folder) == before


def test_fingerprint_of_large_files_is_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(content, "HASH_LIMIT", 4)
    shard = tmp_path / "weights.bin"
    shard.write_bytes(b"0123456789")
    stat = shard.stat()
    before = content.fingerprint(shard)
    shard.write_bytes(b"9876543210")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content.fingerprint(shard) == before  # same size and time: documented blind spot
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert content.fingerprint(shard) != before


def _safetensors(path, payload: int, claimed: int) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [claimed // 4], "data_offsets": [0, claimed]}}
    )
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * payload)


def test_truncated_weights_and_missing_shards_are_named(tmp_path):
    _safetensors(tmp_path / "model.safetensors", 16, 16)
    content.check_model_dir(tmp_path)
    _safetensors(tmp_path / "model.safetensors", 8, 16)
    with pytest.raises(CorruptFileError, match=r"model.safetensors is truncated .*promises"):
        content.check_model_dir(tmp_path, fix="restore it")
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="shards missing beside it: model-00001"):
        content.check_model_dir(tmp_path)
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(CorruptFileError, match="broken.json .*not valid JSON"):
        content.check_intact(tmp_path / "broken.json")


def test_a_folder_of_pruned_layers_is_a_model_folder(tmp_path):
    """``prune --layers-only`` writes only the pruned layers; a run killed between its pruning
    and its evaluation leaves that folder, which the next run's checks must accept."""
    import h5py

    layers = tmp_path / content.PRUNED_LAYERS
    with h5py.File(layers, "w") as f:
        f["blocks/0/q_proj"] = [1.0, 0.0]
    content.check_model_dir(tmp_path)
    layers.write_bytes(layers.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="pruned_layers.h5 .*restore it"):
        content.check_model_dir(tmp_path, fix="restore it")
    layers.unlink()
    with pytest.raises(CorruptFileError, match="holds no model weights"):
        content.check_model_dir(tmp_path)


def test_model_facts_come_from_config_json_without_loading(tmp_path):
    build_tiny_llama(tmp_path, layers=5)
    facts = preflight.model_facts(_settings(tmp_path))
    assert facts == preflight.ModelFacts(n_blocks=5, context=256, model_type="llama")


@pytest.mark.parametrize(
    ("shapley", "message"),
    [
        ({"window": 6}, "'shapley.window' of model 'tiny': window 6 exceeds the model's 5 blocks"),
        ({"stride": 4}, "'shapley.stride' of model 'tiny': stride 4 exceeds shapley.window 3"),
        ({"estimator": "permutation", "n_permutations": 3}, "'shapley.n_permutations'"),
    ],
)
def test_estimator_parameters_are_checked_against_the_block_count(shapley, message):
    with pytest.raises(cfg.ConfigError, match=message):
        preflight.check_estimator(_settings("x", **shapley), 5, "tiny")


@pytest.mark.parametrize(
    ("shapley", "message"),
    [
        ({"window": 10}, None),  # 5 blocks are 10 half players
        ({"window": 11}, "window 11 exceeds the game's 10 players (the halves of 5 blocks)"),
        ({"estimator": "exact"}, None),  # 2^10 coalitions
    ],
)
def test_estimator_parameters_are_checked_against_half_block_players(shapley, message):
    settings = _settings("x", players="halves", **shapley)
    if message is None:
        preflight.check_estimator(settings, 5, "tiny")
    else:
        with pytest.raises(cfg.ConfigError, match=re.escape(message)):
            preflight.check_estimator(settings, 5, "tiny")
    exact = _settings("x", players="halves", estimator="exact")
    with pytest.raises(cfg.ConfigError, match=r"exact needs 2\^24 coalitions for the game's 24"):
        preflight.check_estimator(exact, 12, "tiny")  # c4-llama-12L's halves


def test_whole_number_floats_are_refused_where_integers_are_counted():
    for override, line in [
        ({"calibration.nsamples": 4.0}, "'calibration.nsamples': 4.0 is not an integer; write 4"),
        ({"shapley.window": 3.0}, "'shapley.window': 3.0 is not an integer; write 3"),
        ({"evaluation.zero_shot": {"tasks": ["t"], "limit": 5.0}}, "limit': 5.0 is not an int"),
        ({"calibration.nsamples": 4.5}, "'calibration.nsamples': 4.5 is not of type 'integer'"),
        ({"shapley.window": True}, "'shapley.window': True is not of type 'integer'"),
    ]:
        with pytest.raises(cfg.ConfigError, match=re.escape(line)):
            cfg.validate(tiny_config(**override))
    cfg.validate(tiny_config(**{"evaluation.zero_shot": {"tasks": ["t"], "limit": 0.5}}))


def test_a_local_path_has_one_spelling_and_written_canonically_keeps_its_keys(
    tmp_path, monkeypatch
):
    project, outside = tmp_path / "project", tmp_path / "outside"
    for folder in (project / "tiny", project / "c4", outside / "model", project / "models"):
        folder.mkdir(parents=True)
    (project / "models" / "link").symlink_to(outside / "model")
    (project / "train.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(project)
    spellings = {
        "tiny": ["tiny", "tiny/", "./tiny", str(project / "tiny"), f"{project}/../project/tiny"],
        str(outside / "model"): [str(outside / "model"), f"{outside}/model/", "../outside/model"],
        "models/link": ["models/link", "./models/link/"],  # a link is kept, not resolved
        "results/demo/model": ["results/demo/model", "./results/demo/model"],
        "huggyllama/llama-7b": ["huggyllama/llama-7b"],  # hub ids and missing paths as written
        "absent/": ["absent/"],
    }
    for spelled, written in spellings.items():
        assert [cfg.local_path(w) for w in written] == [spelled] * len(written), spelled
    for spelled, written in {
        "c4": ["c4"],
        "./c4": ["./c4", "c4/", str(project / "c4")],  # the folder, not the hub dataset
        "train.jsonl": ["train.jsonl", "./train.jsonl", str(project / "train.jsonl")],
    }.items():
        assert [cfg.dataset_path(w) for w in written] == [spelled] * len(written), spelled
    # Canonical forms reach every spec exactly as written, so existing caches keep their keys.
    config = tiny_config(**{"calibration.dataset": "./c4", "evaluation.datasets": ["wikitext2"]})
    config["models"]["tiny"]["path"] = "tiny"
    config["evaluation"]["zero_shot"] = {"tasks": ["t"], "include_path": "results/demo/tasks"}
    settings = cfg.model_settings(config, "tiny")
    assert settings["path"] == config["models"]["tiny"]["path"]
    assert settings["calibration"]["dataset"] == config["calibration"]["dataset"]
    assert settings["evaluation"] == config["evaluation"]
    assert cfg.calibration_spec(settings)["model"]["path"] == "tiny"


def test_weightless_and_unsupported_models_are_named(tmp_path):
    build_tiny_llama(tmp_path / "model", layers=2)
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="model holds no model weights .*restore it"):
        content.check_model_dir(tmp_path / "model", fix=content.RESTORE)
    with pytest.raises(cfg.ConfigError, match="model 'tiny': .*holds no model weights"):
        preflight.check_model(_settings(tmp_path / "model"), "tiny")
    build_tiny_llama(tmp_path / "gpt2", layers=2)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(cfg.ConfigError, match="'gpt2' model, a family svnup does not support"):
        preflight.check_model(_settings(tmp_path / "gpt2"), "tiny")
    del config["model_type"]
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(cfg.ConfigError, match="names no model_type"):
        preflight.model_facts(_settings(tmp_path / "gpt2"), "tiny")


def test_cuda_without_a_usable_gpu_names_the_device_key(monkeypatch):
    import svnup.gpus

    settings = {**_settings("x"), "device": "cuda:1"}
    monkeypatch.setattr(svnup.gpus, "cuda_problem", lambda device: f"{device} is not here")
    with pytest.raises(cfg.ConfigError, match=r"'models.tiny.device': cuda:1, but cuda:1 is not"):
        preflight.check_device(settings, "tiny")
    preflight.check_device({**settings, "device": "cpu"}, "tiny")  # never asks about a GPU


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("results/m/s0.7x/ppl.json", "'s0.7x' does not name a target sparsity"),
        ("results/m/s-0.5/ppl.json", "'s-0.5' does not name a target sparsity"),
        ("results/m/s0.7.1/ppl.json", "'s0.7.1' does not name a target sparsity"),
        ("results/m/s1.5/ppl.json", "target sparsity 1.5 must be in"),
        ("results/m/s0.5/uniform/foo/ppl.json", "unknown pruner 'foo'"),
        ("results/m/s0.5/bar/ppl.json", "unknown allocation 'bar'"),
        ("results/m/s0.5/a/b/c/ppl.json", "expected results/<model>/s<sparsity>/"),
        ("results/m/weights", "'weights' is not a result of the workflow"),
        ("results/m/s0.5/uniform/foo/recipe.yaml", "unknown pruner 'foo'"),
        ("results/m/s0.5/recipe.yaml", "expected results/<model>/s<sparsity>/"),
        ("results/x/s0.5/ppl.json", "model 'x' is not in config key 'models'"),
    ],
)
def test_bad_target_paths_are_named(tmp_path, target, message):
    config = {"models": {"m": {"path": "m"}}, "allocation": {"min": 0.0, "max": 0.99}}
    config.update({k: {} for k in cfg.OVERRIDABLE if k not in config})
    with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(")):
        preflight.target_model(config, target)


def test_good_target_paths_name_their_model():
    config = {"models": {"m": {"path": "m"}}, "allocation": {"min": 0.0, "max": 0.99}}
    config.update({k: {} for k in cfg.OVERRIDABLE if k not in config})
    for target in (
        "results/m/s0.5/ppl.json",
        "results/m/s0.70/owl/ppl.json",
        "results/m/s0.5/uniform/sparsegpt/ppl.json",
        "results/m/s0.5/svnup/sparsegpt/recipe.yaml",
        "results/m/summary.csv",
        "results/m/calibration/0123456789ab/calibration.h5",
    ):
        assert preflight.target_model(config, target) == "m"
    assert preflight.target_model(config, "results/gguf/0123456789ab") is None
    assert preflight.target_model(config, "report.html") is None


def test_model_targets_replace_the_global_grid_key_by_key():
    config = tiny_config()
    config["models"]["tiny"]["targets"] = {"sparsities": [0.4, 0.6], "allocations": ["owl"]}
    config["models"]["other"] = {"path": "other"}
    cfg.validate(config)
    own = cfg.model_settings(config, "tiny")["targets"]
    assert own == {"sparsities": [0.4, 0.6], "allocations": ["owl"], "pruners": ["wanda"]}
    grid = {k: config["targets"][k] for k in cfg.GRID}
    assert cfg.model_settings(config, "other")["targets"] == grid
    assert cfg.model_spec(cfg.model_settings(config, "tiny")) == {
        "path": "tiny",
        "dtype": "float32",
        "revision": "main",
    }, "targets are no part of any cache key"
    config["models"]["tiny"]["targets"] = {"models": ["tiny"]}
    with pytest.raises(cfg.ConfigError, match="'models.tiny.targets.models': unknown key"):
        cfg.validate(config)
    config["models"]["tiny"]["targets"] = {"sparsities": [0.995]}
    with pytest.raises(cfg.ConfigError, match="^models.tiny.targets.sparsities: target sparsity"):
        cfg.validate(config)


def test_a_model_cannot_take_the_name_of_the_gguf_folder():
    config = tiny_config()
    config["models"]["gguf"] = {"path": "tiny"}
    with pytest.raises(cfg.ConfigError, match="'models.gguf': the name is taken"):
        cfg.validate(config)


def test_summary_reads_exactly_the_runs_it_is_given(tmp_path):
    def run(name, allocation, ppl):
        path = tmp_path / name / "ppl.json"
        write_json(
            path,
            {
                "allocation": allocation,
                "pruner": "wanda",
                "target_sparsity": 0.5,
                "perplexity": {"d": ppl},
            },
        )
        return path

    given = [run("a", "svnup", 10.0), run("b", "uniform", 12.0)]
    run("stale", "owl", 99.0)  # another file in the same folder is not a run of the grid
    out = tmp_path / "summary.csv"
    summary(given, out)
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and "owl" not in out.read_text()
    with pytest.raises(ValueError, match="runs given twice"):
        summary([*given, run("c", "svnup", 11.0)], out)
