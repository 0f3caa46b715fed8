"""Default LoRA-style target modules per architecture, as data.

Keys are ``config.model_type`` strings from Hugging Face transformers. Values are module-name suffixes
(the last dotted component(s) of a module path), matched the same way a ``target_modules`` list is.
Each name was checked against tiny models built from transformers 5.x configs (see ``tests/test_presets.py``).
The defaults cover every attention and MLP projection of a block; pass ``target_modules`` explicitly for a
narrower choice (PEFT's own defaults are the query/value projections only).
"""

from __future__ import annotations

__all__ = [
    "FEEDFORWARD_MODULES",
    "OUTPUT_HEADS",
    "TARGET_MODULES",
    "UnknownModelTypeError",
    "default_target_modules",
    "is_output_head",
]

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_LIKE = ("query", "key", "value", "dense")
_OPT_LIKE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # transformers Conv1D layers, weight stored (in, out)
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": _OPT_LIKE,
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "t5": ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),  # wi_0 / wi_1: gated variants (T5 v1.1, flan-t5)
    "bart": _OPT_LIKE,
}

# The feed-forward block's output projection (its input is the FFN's hidden activation), per model_type: where
# activation-scaling methods scale inputs rather than outputs ((IA)^3's feedforward_modules; peft's defaults).
FEEDFORWARD_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("down_proj",),
    "mistral": ("down_proj",),
    "qwen2": ("down_proj",),
    "gemma": ("down_proj",),
    "gpt2": ("mlp.c_proj",),
    "gpt_neox": ("dense_4h_to_h",),
    "opt": ("fc2",),
    "bert": ("output.dense",),
    "roberta": ("output.dense",),
    "t5": ("wo",),
    "bart": ("fc2",),
}

# Module-path suffixes of the final projection of common task heads; "all-linear" leaves them alone.
# Causal LM: lm_head (embed_out in older gpt_neox); masked LM: bert cls.predictions.decoder, roberta
# lm_head.decoder; sequence classification: score, classifier, classifier.out_proj,
# classification_head.out_proj; extractive QA: qa_outputs.
OUTPUT_HEADS: tuple[str, ...] = (
    "lm_head",
    "embed_out",
    "lm_head.decoder",
    "cls.predictions.decoder",
    "score",
    "classifier",
    "classifier.out_proj",
    "classification_head.out_proj",
    "qa_outputs",
)


class UnknownModelTypeError(KeyError):
    """No preset for this ``model_type``; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else ""


def default_target_modules(model_type: str) -> tuple[str, ...]:
    """Return the default target module names for a transformers ``config.model_type``.

    Raises:
        UnknownModelTypeError: ``model_type`` has no preset; pass ``target_modules`` explicitly.
    """
    try:
        return TARGET_MODULES[model_type]
    except KeyError:
        known = ", ".join(sorted(TARGET_MODULES))
        msg = f"no default target modules for model_type {model_type!r}; known: {known}. Pass target_modules."
        raise UnknownModelTypeError(msg) from None


def is_output_head(module_path: str) -> bool:
    """True if ``module_path`` equals an ``OUTPUT_HEADS`` entry or ends with ``"." + entry``."""
    return any(module_path == h or module_path.endswith("." + h) for h in OUTPUT_HEADS)
