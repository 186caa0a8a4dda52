"""Shared fixtures: tiny random LLaMA / OPT models and the optional ../shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
C4_LLAMA = SHARED / "models" / "c4-llama-12L"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-v1"
PTB = SHARED / "data" / "ptb"
C4 = SHARED / "data" / "c4" / "c4-validation-2k.jsonl"


def needs_shared(path: Path = SHARED):
    """Skip marker for tests that read the read-only fixtures beside the checkout."""
    return pytest.mark.skipif(
        not path.exists(), reason=f"fixture {path} is absent (../shared is not beside the checkout)"
    )


def build_tiny_llama(path: Path, layers: int = 4, seed: int = 0, **overrides) -> Path:
    """Save a random LLaMA with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{"vocab_size": 96, **overrides},
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def build_tiny_opt(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """Save a random OPT (pre-LayerNorm, learned positions)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=96,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
    )
    OPTForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_path(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))
