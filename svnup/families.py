"""The model families the block engine supports: where each keeps its blocks and stages.

A family is chosen by ``config.model_type``. The table lives apart from ``svnup.models`` and imports
neither torch nor transformers, so the checks before planning can refuse an unsupported model type
from its config.json in milliseconds (``svnup.preflight``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its input stage, blocks and output stage.

    ``softcap``: the model's forward caps its logits, ``c * tanh(logits / c)`` with
    ``c = config.final_logit_softcapping`` (when that is set). ``attention``: the attention
    module inside a block; the block's other linear layers form its MLP (``svnup.players``).
    """

    blocks: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    head: str = "lm_head"
    softcap: bool = False
    attention: str = "self_attn"


_LLAMA_LIKE = Family(
    blocks="model.layers",
    inputs=("model.embed_tokens", "model.rotary_emb"),
    outputs=("model.norm",),
)
_GEMMA = Family(
    blocks="model.layers",
    inputs=("model.embed_tokens", "model.rotary_emb"),
    outputs=("model.norm",),
    softcap=True,
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    # Gemma 3 with its vision tower: the text-only forward of the language model; this model's
    # forward does not soft-cap its logits (Gemma 3 checkpoints leave the cap unset anyway).
    "gemma3": Family(
        blocks="model.language_model.layers",
        inputs=("model.language_model.embed_tokens", "model.language_model.rotary_emb"),
        outputs=("model.language_model.norm",),
    ),
    "opt": Family(
        blocks="model.decoder.layers",
        inputs=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        outputs=("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
}


def family_of(model_type: str) -> Family:
    """The family for ``config.model_type``, or a one-line error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported model types: {supported}"
        ) from None
