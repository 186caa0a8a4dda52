"""Shared fixtures: tiny random models of every family and the optional ../shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def model_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per sequence from the model's own full forward."""
    with torch.no_grad():
        logits = model(ids).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return ref.view(ids.shape[0], -1).double().sum(1)


def random_ids(vocab_size: int, n: int = 5, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))


def build_tiny_llama(path: Path, layers: int = 4, seed: int = 0, **overrides) -> Path:
    """Save a random LLaMA with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, **overrides},
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


LLAMA_LAYERS = (  # the linear layers of a LLaMA block, in the order the block holds them
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SLIDING_WINDOW = 4  # tokens; the tests run sequences of 16-32 so the window cuts in
_TINY_DECODER = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # Larger than the default 0.02 so attention is far from uniform and the soft caps bite.
    "initializer_range": 0.2,
}


def _mixed_layer_types(layers: int) -> list[str]:
    """Sliding-window block 0, then global and sliding layers alternating."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _gemma_text(layers: int) -> dict:
    return {
        **_TINY_DECODER,
        "num_hidden_layers": layers,
        "query_pre_attn_scalar": 8,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": _mixed_layer_types(layers),
        "final_logit_softcapping": 0.5,
        "attn_logit_softcapping": 1.0,
    }


def _save_random(model_class, config, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model_class(config).save_pretrained(path)
    return path


def build_tiny_gemma2(path: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save a random Gemma 2: sliding and global layers, soft-capped attention and logits, tied
    head."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _save_random(Gemma2ForCausalLM, Gemma2Config(**_gemma_text(layers)), path, seed)


def build_tiny_gemma3_text(path: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save a random Gemma 3 text model: sliding and global layers with their own rotary bases."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _save_random(Gemma3ForCausalLM, Gemma3TextConfig(**_gemma_text(layers)), path, seed)


def build_tiny_gemma3(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """Save a random multimodal Gemma 3 (``model_type`` gemma3) with a one-layer vision tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    config = Gemma3Config(
        text_config=_gemma_text(layers),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_id=95,
        boi_token_id=93,
        eoi_token_id=94,
        initializer_range=_TINY_DECODER["initializer_range"],
    )
    return _save_random(Gemma3ForConditionalGeneration, config, path, seed)


def build_tiny_phi3(path: Path, layers: int = 3, seed: int = 0) -> Path:
    """Save a random Phi-3 (fused qkv_proj and gate_up_proj) with a sliding window everywhere."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        **{k: v for k, v in _TINY_DECODER.items() if k != "head_dim"},
        num_hidden_layers=layers,
        sliding_window=SLIDING_WINDOW,
    )
    return _save_random(Phi3ForCausalLM, config, path, seed)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_path(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def tiny_gemma2_path(tmp_path_factory) -> Path:
    return build_tiny_gemma2(tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture(scope="session")
def tiny_gemma3_text_path(tmp_path_factory) -> Path:
    return build_tiny_gemma3_text(tmp_path_factory.mktemp("tiny-gemma3-text"))


@pytest.fixture(scope="session")
def tiny_gemma3_path(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_phi3_path(tmp_path_factory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


_GGUF_NAMES = {  # HF linear and norm names in a LLaMA block -> llama.cpp's
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _rotary_pairs(weight, heads: int):
    """llama.cpp's layout of a query/key projection: each head's rotary halves interleaved."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(hf_dir: Path, out: Path) -> Path:
    """Write the LLaMA (float32 weights) and byte-level BPE tokenizer saved in ``hf_dir`` as a
    GGUF file, as llama.cpp's converter lays it out, so that transformers reads back the same
    model."""
    import json

    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    c = model.config
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    if bpe["merges"]:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    else:  # a vocabulary of single bytes: transformers derives the (no) merges from scores
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for name, gguf_name in _GGUF_NAMES.items():
            weight = weights[f"model.layers.{i}.{name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if gguf_name == "attn_q" else c.num_key_value_heads
                weight = _rotary_pairs(weight, heads).copy()
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weight)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
