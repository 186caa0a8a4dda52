"""The block engine reproduces the full model, for every supported family."""

import pytest
import torch
from conftest import SLIDING_WINDOW, STORIES, model_nll, needs_shared, random_ids
from transformers import AutoModelForCausalLM

from svnup.models import BlockKwargs, BlockModel, family_of, load_model


def _block_logits_match(path, attn="sdpa", batch_size=3, offload=False):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    engine = BlockModel(model, batch_size=batch_size, offload=offload)
    ids = random_ids(model.config.get_text_config().vocab_size)
    hidden, kwargs = engine.embed(ids)
    hidden = engine.forward_blocks(hidden, kwargs)
    nll = engine.sequence_nll(hidden, ids, chunk_tokens=30)
    torch.testing.assert_close(nll, model_nll(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_gqa_blocks_reproduce_model(tiny_llama_path, attn):
    _block_logits_match(tiny_llama_path, attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_opt_blocks_reproduce_model(tiny_opt_path, attn):
    _block_logits_match(tiny_opt_path, attn)


# Gemma 2 does not support sdpa (its attention soft cap needs eager).
@pytest.mark.parametrize(
    "fixture, attn",
    [
        ("tiny_gemma2_path", "eager"),
        ("tiny_gemma3_text_path", "sdpa"),
        ("tiny_gemma3_text_path", "eager"),
        ("tiny_gemma3_path", "sdpa"),
        ("tiny_gemma3_path", "eager"),
        ("tiny_phi3_path", "sdpa"),
        ("tiny_phi3_path", "eager"),
    ],
)
def test_new_family_blocks_reproduce_model(fixture, attn, request):
    """Sequences of 24 tokens against a sliding window of 4, the batch split 3 + 2."""
    _block_logits_match(request.getfixturevalue(fixture), attn)


@pytest.mark.parametrize("fixture", ["tiny_gemma2_path", "tiny_gemma3_path"])
def test_offloaded_tied_head_reproduces_model(fixture, request):
    _block_logits_match(request.getfixturevalue(fixture), "eager", batch_size=2, offload=True)


def _causal_band(seqlen: int, window: int | None) -> torch.Tensor:
    """[q, k] True where query q may attend to key k: itself and the ``window - 1`` before it."""
    q = torch.arange(seqlen)[:, None]
    k = torch.arange(seqlen)[None, :]
    return (k <= q) & (k > q - window) if window else k <= q


@pytest.mark.parametrize(
    "fixture, layer_types",
    [("tiny_gemma2_path", "SFSF"), ("tiny_gemma3_text_path", "SFSF"), ("tiny_phi3_path", "SSS")],
)
def test_each_block_gets_its_attention_types_mask(fixture, layer_types, request):
    """Sliding layers (S) see the last SLIDING_WINDOW tokens, global ones (F) every earlier one."""
    model = AutoModelForCausalLM.from_pretrained(
        request.getfixturevalue(fixture), attn_implementation="eager"
    )
    _, kwargs = BlockModel(model).embed(random_ids(96, n=2, seqlen=16))
    for index, layer_type in enumerate(layer_types):
        allowed = kwargs[index]["attention_mask"][0, 0] == 0
        window = SLIDING_WINDOW if layer_type == "S" else None
        assert torch.equal(allowed, _causal_band(16, window)), f"block {index}"


@pytest.mark.parametrize("fixture", ["tiny_gemma2_path", "tiny_gemma3_text_path"])
def test_reproduction_needs_per_block_kwargs_and_the_logit_cap(fixture, request):
    """The reproduction tests can fail: block 0's arguments for every block (the wrong mask and,
    in Gemma 3, the wrong rotary base on global layers) or uncapped logits miss the model."""
    model = AutoModelForCausalLM.from_pretrained(
        request.getfixturevalue(fixture), attn_implementation="eager"
    )
    engine = BlockModel(model)
    ids = random_ids(96)
    ref = model_nll(model, ids)
    hidden, kwargs = engine.embed(ids)
    block0_everywhere = BlockKwargs((kwargs[0],) * engine.n_blocks)
    wrong_mask = engine.sequence_nll(engine.forward_blocks(hidden, block0_everywhere), ids)
    assert not torch.allclose(wrong_mask, ref, rtol=1e-3)
    out = engine.forward_blocks(hidden, kwargs)
    torch.testing.assert_close(engine.sequence_nll(out, ids), ref, rtol=1e-5, atol=1e-5)
    engine.logit_softcap = None
    assert not torch.allclose(engine.sequence_nll(out, ids), ref, rtol=1e-3)


@needs_shared(STORIES)
def test_stories260k_blocks_reproduce_model():
    _block_logits_match(STORIES)


def test_captured_kwargs_are_the_models_own(tiny_llama_path):
    engine, _ = load_model(tiny_llama_path, with_tokenizer=False)
    _, kwargs = engine.embed(torch.ones(2, 8, dtype=torch.long))
    for index in range(engine.n_blocks):
        cos, sin = kwargs[index]["position_embeddings"]
        assert cos.shape[-2] == 8 and "position_ids" in kwargs[index]
        assert kwargs[index]["use_cache"] is False and "cache" not in kwargs[index]


def test_block_the_forward_never_reaches_is_an_error(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    model.config.num_hidden_layers = 3  # the model's forward now runs only layers[:3]
    with pytest.raises(RuntimeError, match="never called block 3"):
        BlockModel(model).embed(torch.ones(1, 8, dtype=torch.long))


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
