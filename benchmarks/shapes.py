"""Checkpoints with the shapes of real models and random weights: fixtures for cost, not quality.

Why: what the pipeline costs at the size users prune (issue 23) depends on the shapes of the
weights and of the vocabulary, never on their values, and no real checkpoint can be downloaded
here or reach the GPU machine. So this writes a Hugging Face checkpoint with the configuration of
LLaMA-2-7B, Llama-3-8B, Qwen2.5-7B or LLaMA-2-13B, random weights, and a tokenizer of exactly the
model's vocabulary size (a byte-level BPE trained on local text, the documentation every Python
installation ships, padded with never-produced entries up to the size), plus scaled-down variants
of the same architecture: the same width with fewer blocks, or the same depth with a narrower
width (head size, MLP ratio and query groups kept). LLaMA-2-70B is written for the plan only: its
config and tokenizer, never its weights.

Only the output head is not random: it predicts the local text's token frequencies from the
dense model's hidden states (``fit_head``). With every weight random the dense model predicts
nothing, pruning a block changes its loss by noise of either sign, and the recommended
allocation (damage curves fitted to the loss a probe adds) may find no block whose damage is
positive; against this head pruning a block raises the loss, as in a real model.

    python benchmarks/shapes.py llama-2-7b --blocks 2              # 2 blocks of LLaMA-2-7B
    python benchmarks/shapes.py llama-2-7b --width 256             # 32 blocks, hidden 256
    python benchmarks/shapes.py llama-2-70b                         # config + tokenizer only
    python benchmarks/shapes.py --standin benchmarks/.cache/data    # the WikiText-2 stand-in

Everything goes under benchmarks/.cache/shapes/ (git-ignored) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "shapes"

# Each entry is what the model's config.json on the Hugging Face hub says (fields that change
# a weight's shape or the work of a forward); sources:
# - llama-2-7b: meta-llama/Llama-2-7b-hf config.json (hidden 4096, intermediate 11008, 32 layers,
#   32 heads, 32 KV heads, vocab 32000, max positions 4096, rms_norm_eps 1e-5, untied head), as
#   quoted in github.com/microsoft/Olive examples/llm/config.py (model_id
#   meta-llama/Llama-2-7b-chat-hf, the same architecture).
# - llama-2-13b: hidden 5120, intermediate 13824, 40 layers, 40 heads (huggyllama/llama-13b
#   config.json as linked from github.com/scottlogic-alex/llm-memory-calculator llama-sizes.md;
#   LLaMA-2-13B has the same shapes, max positions 4096).
# - llama-3-8b: meta-llama/Meta-Llama-3-8B config.json (hidden 4096, intermediate 14336, 32 layers,
#   32 heads, 8 KV heads, vocab 128256, max positions 8192, rope_theta 500000, rms_norm_eps 1e-5),
#   as quoted for Meta-Llama-3-8B-Instruct (same architecture) in public code and in
#   github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md (Llama-3.1-8B: the same shapes).
# - qwen2.5-7b: Qwen/Qwen2.5-7B config.json (hidden 3584, intermediate 18944, 28 layers, 28 heads,
#   4 KV heads, vocab 152064, biases on q/k/v, max positions 131072, rope_theta 1e6,
#   rms_norm_eps 1e-6, untied head); the module tree with these shapes is printed in
#   github.com/Retruth/deontic nlp_models/qwen2/README.md (Embedding(152064, 3584), k_proj
#   3584 -> 512 with bias).
# - llama-2-70b: meta-llama/Llama-2-70b-hf config.json (hidden 8192, intermediate 28672,
#   80 layers, 64 heads, 8 KV heads, vocab 32000, max positions 4096); the module tree is in the
#   h2oai Llama-2-70B-chat clone's model card, the KV heads in Meta's llama README (GQA at 70B).
SHAPES: dict[str, dict] = {
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "llama-2-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
    "llama-2-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
}
PLAN_ONLY = ("llama-2-70b",)  # config and tokenizer: its weights would be 138 GB in bf16
UNUSED = "<unused-{}>"  # vocabulary entries no merge produces, up to the model's size


def scaled(name: str, blocks: int | None = None, width: int | None = None, vocab=None) -> dict:
    """The configuration of ``name`` with fewer blocks, a narrower width (the same head size,
    MLP ratio and query heads per KV head, MLP rounded to a multiple of 16) or another
    vocabulary size."""
    shape = dict(SHAPES[name])
    if blocks is not None:
        shape["num_hidden_layers"] = blocks
    if width is not None and width != shape["hidden_size"]:
        head = shape["hidden_size"] // shape["num_attention_heads"]
        if width % head:
            raise ValueError(f"width {width} is not a multiple of {name}'s head size {head}")
        group = shape["num_attention_heads"] // shape["num_key_value_heads"]
        ratio = shape["intermediate_size"] / shape["hidden_size"]
        heads = width // head
        shape.update(
            hidden_size=width,
            intermediate_size=16 * round(ratio * width / 16),
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // group),
            head_dim=head,
        )
    if vocab is not None:
        shape["vocab_size"] = vocab
    return shape


def variant_name(name: str, blocks: int | None, width: int | None, vocab: int | None) -> str:
    parts = [name]
    parts += [f"L{blocks}"] if blocks is not None else []
    parts += [f"d{width}"] if width is not None else []
    parts += [f"v{vocab}"] if vocab is not None else []
    return "-".join(parts)


def local_texts() -> list[str]:
    """Text every Python installation has (svnup's demo corpus), in a fixed order."""
    from svnup.demo import corpus_documents

    return corpus_documents()


def padded_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE (BOS first, like LLaMA's) with exactly ``vocab_size`` entries: trained on
    ``texts`` as far as they allow, then padded with entries that no merge ever produces, so the
    tokenizer's size and the model's embedding agree while the text tokenises as trained."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from svnup.demo import BOS, EOS, train_tokenizer

    trained = train_tokenizer(texts, vocab_size)._tokenizer
    spec = json.loads(trained.to_str())
    vocab = spec["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the trained vocabulary has {len(vocab)} entries, over {vocab_size}")
    for index in range(len(vocab), vocab_size):
        vocab[UNUSED.format(index)] = index
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=BOS, eos_token=EOS
    )
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"padded tokenizer has {len(tokenizer)} entries, not {vocab_size}")
    return tokenizer


def fit_head(model, tokenizer, texts: list[str], tokens: int = 4096, seqlen: int = 256) -> None:
    """Make the output head predict the unigram distribution of ``texts`` along the mean of the
    final hidden states (over ``tokens`` tokens, ``seqlen`` at a time): row v is log p(v) times
    that mean over its squared norm, so the dense model's logits are the log frequencies, scaled
    by how far each hidden state lies along the mean. A block's pruning moves the hidden states
    off it and raises the loss. Random features predict nothing beyond frequencies on new text,
    so the head uses none. Cheap: one forward over ``tokens``."""
    import torch

    ids = tokenizer(" ".join(texts), return_tensors="pt").input_ids[0]
    head = model.get_output_embeddings()
    counts = torch.bincount(ids, minlength=head.weight.shape[0]).double() + 0.1
    log_frequency = (counts / counts.sum()).log().float()
    rows = max(1, min(tokens, ids.numel()) // seqlen)
    inputs = ids[: rows * seqlen].view(rows, seqlen).to(head.weight.device)
    with torch.no_grad():
        hidden = model.model(input_ids=inputs).last_hidden_state.float()
        mean = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        weight = log_frequency.to(mean.device)[:, None] * (mean / mean.square().sum())[None]
        head.weight.copy_(weight.to(head.weight.dtype))


def write_checkpoint(
    shape: dict,
    out: Path,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    weights: bool = True,
    texts: list[str] | None = None,
) -> Path:
    """Write config, tokenizer and (unless ``weights`` is off) random weights of ``shape`` to
    ``out``, all or nothing; a finished folder is left as it is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from svnup.io import atomic_path
    from svnup.models import resolve_dtype

    out = Path(out)
    if (out / "config.json").exists():
        return out
    texts = texts or local_texts()
    tokenizer = padded_tokenizer(shape["vocab_size"], texts)
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(
        shape["model_type"],
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if weights:
            torch.manual_seed(seed)
            default = torch.get_default_dtype()
            torch.set_default_dtype(resolve_dtype(dtype))
            try:
                with torch.device(device):
                    model = AutoModelForCausalLM.from_config(config)
            finally:
                torch.set_default_dtype(default)
            fit_head(model, tokenizer, texts)
            model.save_pretrained(tmp)
            del model
        else:
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def write_standin(out: Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """A local WikiText-2 stand-in (``wikitext-2-standin/{train,test}.jsonl``, read with the
    WikiText-2 protocol because of its name): the local text as rows, the test split in
    corpus order and the train split shuffled. Calibration and evaluation read the same text,
    which a cost fixture allows: nothing measured here depends on the words."""
    out = Path(out) / "wikitext-2-standin"
    if (out / "test.jsonl").exists():
        return out
    rows = texts or local_texts()
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    out.mkdir(parents=True, exist_ok=True)
    for split, docs in (("test", rows), ("train", shuffled)):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        (out / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    return out


def weight_bytes(shape: dict, dtype_bytes: int) -> dict:
    """Bytes of the linear (prunable) weights, the embeddings and head, and the whole model."""
    h, mlp, blocks = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head = shape.get("head_dim") or h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head
    linear = blocks * (2 * h * h + 2 * h * kv + 3 * h * mlp)
    embeddings = shape["vocab_size"] * h * (1 if shape["tie_word_embeddings"] else 2)
    return {
        "linear": linear * dtype_bytes,
        "embeddings": embeddings * dtype_bytes,
        "total": (linear + embeddings) * dtype_bytes,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", nargs="?", choices=list(SHAPES))
    p.add_argument("--blocks", type=int, default=None, help="fewer blocks, the same width")
    p.add_argument("--width", type=int, default=None, help="a narrower width, the same depth")
    p.add_argument("--vocab", type=int, default=None, help="another vocabulary size")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="where the random weights are drawn")
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder to write")
    p.add_argument("--standin", type=Path, default=None, help="write the WikiText-2 stand-in")
    args = p.parse_args(argv)
    if args.shape is None and args.standin is None:
        p.error("name a shape or --standin")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.standin is not None:
        print(f"wrote {write_standin(args.standin)}")
    if args.shape is not None:
        shape = scaled(args.shape, args.blocks, args.width, args.vocab)
        name = variant_name(args.shape, args.blocks, args.width, args.vocab)
        out = args.out or CACHE / f"{name}-{args.dtype}"
        weights = args.shape not in PLAN_ONLY or args.blocks is not None or args.width is not None
        write_checkpoint(shape, out, args.dtype, args.device, weights=weights)
        size = weight_bytes(shape, {"float32": 4}.get(args.dtype, 2))["total"]
        kind = "checkpoint" if weights else "config and tokenizer (plan only)"
        print(f"wrote {out}: {kind}, {math.ceil(size / 2**20)} MiB of weights in {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
