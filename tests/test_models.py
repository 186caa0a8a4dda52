"""The block engine reproduces the full model, for every supported family."""

import pytest
import torch
import torch.nn.functional as F
from conftest import STORIES, needs_shared
from transformers import AutoModelForCausalLM

from svnup.models import BlockModel, family_of, load_model


def _block_logits_match(path, attn="sdpa", batch_size=3):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    engine = BlockModel(model, batch_size=batch_size)
    ids = torch.randint(
        0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(1)
    )
    hidden, kwargs = engine.embed(ids)
    hidden = engine.forward_blocks(hidden, kwargs)
    nll = engine.sequence_nll(hidden, ids, chunk_tokens=30)
    with torch.no_grad():
        logits = model(ids).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ref = ref.view(5, -1).double().sum(1)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa_blocks_reproduce_model(tiny_llama_path, attn):
    _block_logits_match(tiny_llama_path, attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_opt_blocks_reproduce_model(tiny_opt_path, attn):
    _block_logits_match(tiny_opt_path, attn)


@needs_shared(STORIES)
def test_stories260k_blocks_reproduce_model():
    _block_logits_match(STORIES)


def test_captured_kwargs_are_the_models_own(tiny_llama_path):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    _, kwargs = engine.embed(torch.ones(2, 8, dtype=torch.long))
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-2] == 8 and "position_ids" in kwargs
    assert kwargs["use_cache"] is False and "cache" not in kwargs


def test_offload_keeps_weights_on_cpu_and_matches(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    engine = BlockModel(model, offload=True)
    ids = torch.randint(0, 96, (2, 16))
    hidden, kwargs = engine.embed(ids)
    out = engine.forward_blocks(hidden, kwargs)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with engine.on_device(engine.blocks[0]), engine.on_device(engine.blocks[0]):
        pass
    assert engine._resident[id(engine.blocks[0])] == 0
    assert out.shape == hidden.shape


def test_unsupported_model_type_names_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama.*opt"):
        family_of("gpt2")


def test_missing_local_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_bad_dtype_and_device(tiny_llama_path):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(tiny_llama_path, dtype="float8", with_tokenizer=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(tiny_llama_path, device="cuda:0", with_tokenizer=False)


def test_block_params_counts_linear_weights(tiny_llama_path):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    # q, o: 32x32; k, v: 16x32 (2 KV heads of 8); gate, up: 64x32; down: 32x64
    assert engine.block_params() == [2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32] * 4
