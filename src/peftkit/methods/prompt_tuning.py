"""Prompt tuning: n trainable soft-token embeddings prepended to the input sequence; the model is untouched.

Paper: Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv 2104.08691.
peft: `tuners/prompt_tuning` (PromptTuningConfig, PromptEmbedding), whose config fields this file keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.adapter import Adapter, AdapterContext
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype

__all__ = ["PromptTuningConfig", "PromptTuningAdapter", "INPUT_EMBEDDINGS", "INITS"]

# Default target: the input token embedding of common architectures (llama-like, OPT, BART: embed_tokens; GPT-2:
# wte; BERT/RoBERTa: word_embeddings; GPT-NeoX: embed_in). Set target_modules to the path of
# model.get_input_embeddings() for anything else.
INPUT_EMBEDDINGS = r"(.*\.)?(embed_tokens|wte|word_embeddings|embed_in)"
INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
IGNORE_INDEX = -100
_PEFT_ABSENT = {"target_modules": INPUT_EMBEDDINGS, "exclude_modules": None, "layers_to_transform": None,
                "layers_pattern": None, "bias": "none"}  # location fields peft's PromptTuningConfig lacks


def _check_optional_int(name: str, value: Any, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConfigError(name, f"must be None or an integer >= {low}, got {value!r}")


@register_config
@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning settings with peft's field names (peft_type "PROMPT_TUNING").

    num_virtual_tokens: n soft tokens (0 allowed: the model is unchanged). token_dim: the embedding width d
    (None = the targeted embedding's). prompt_tuning_init: "RANDOM" (N(0, 1), as peft), "SAMPLE_VOCAB" (rows of the
    embedding table at uniformly drawn token ids) or "TEXT" (the embeddings of prompt_tuning_init_text tokenized by
    tokenizer_name_or_path with tokenizer_kwargs, repeated or truncated to n). num_transformer_submodules: 1 (or
    None); encoder-decoder prompts are not supported. num_attention_heads / num_layers: recorded for peft, unused.
    target_modules: the one input embedding module (default: INPUT_EMBEDDINGS, common names).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    method_name: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self._set("target_modules", INPUT_EMBEDDINGS)
        super().__post_init__()

    def validate(self) -> None:
        if self.num_virtual_tokens is None:
            raise ConfigError("num_virtual_tokens", "must be an integer >= 0 (the number of soft tokens), got None")
        _check_optional_int("num_virtual_tokens", self.num_virtual_tokens, 0)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_optional_int(name, getattr(self, name), 1)
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError("num_transformer_submodules", "only 1 (decoder-only or encoder-only models) is "
                                                            f"supported, got {self.num_transformer_submodules!r}")
        if self.prompt_tuning_init not in INITS:
            raise ConfigError("prompt_tuning_init", f"must be one of {INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init_text", "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                                                         "tokenizer_name_or_path; set both or use 'RANDOM'")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError("tokenizer_kwargs", "is only used with prompt_tuning_init='TEXT'; remove it")

    def to_dict(self) -> dict[str, Any]:
        """Location fields peft's PromptTuningConfig does not have are left out while they hold their defaults."""
        return {k: v for k, v in super().to_dict().items() if k not in _PEFT_ABSENT or v != _PEFT_ABSENT[k]}


@register_adapter("prompt_tuning", PromptTuningConfig)
class PromptTuningAdapter(Adapter):
    """Prompt tuning (arXiv 2104.08691): inputs_embeds = [P; E(input_ids)], P (n, d) trainable, the model frozen.

    Hosted on the input embedding E, where it adds nothing per token; `transform_inputs` rewrites the model call:
    input_ids -> inputs_embeds with P prepended to every row, attention_mask gets n leading ones, labels n leading
    -100 (no loss on the prompt), position_ids continue after the prefix (0..n-1, then n + the given ids) and
    token_type_ids get n leading zeros. The output has T + n positions. Not mergeable; not identity at init.
    """

    transforms_inputs = True

    def __init__(self, ops: LayerOps, config: PromptTuningConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None and ctx.path else "layer"
        if ops.kind != "embedding":
            raise UnsupportedLayerError(f"{path}: prompt tuning is hosted on the input token embedding (nn.Embedding), "
                                        f"not a {ops.kind} layer; set target_modules to the input embedding's path")
        shared = ctx.shared if ctx is not None else {}
        if "prompt_host" in shared:
            raise ConfigError("target_modules", f"prompt tuning needs exactly one input embedding, matched "
                                                f"{shared['prompt_host']!r} and {path!r}; target one module path")
        shared["prompt_host"] = path
        d = ops.out_features  # the embedding width
        if config.token_dim is not None and config.token_dim != d:
            raise ConfigError("token_dim", f"is {config.token_dim} but {path} embeds into {d}; set token_dim={d}")
        n, dtype = config.num_virtual_tokens, adapter_dtype(ops)
        self.prompt_embeddings = self.new_param((n, d), dtype, ops.weight.device)  # (n, d)
        if initialize:
            with torch.no_grad():
                self.prompt_embeddings.copy_(self._initial_prompt(config))

    def _initial_prompt(self, config: PromptTuningConfig) -> Tensor:
        """P0 (n, d) as peft's PromptEmbedding draws it."""
        n, table = config.num_virtual_tokens, self.ops.module.weight  # (V, d)
        if config.prompt_tuning_init == "RANDOM":
            return torch.randn(self.prompt_embeddings.shape)  # (n, d), nn.Embedding's default N(0, 1)
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, table.shape[0], (n,), dtype=torch.long)  # (n,)
        else:
            ids = torch.tensor(_text_token_ids(config, n), dtype=torch.long)  # (n,)
        return table.detach()[ids.to(table.device)].float()  # (n, d)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        """No per-token contribution: the prompt enters through transform_inputs."""
        return x.new_zeros((*x.shape, self.prompt_embeddings.shape[1]), dtype=self.prompt_embeddings.dtype)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return y

    def disk_names(self) -> dict[str, str]:
        return {}

    def root_disk_names(self) -> dict[str, str]:
        """One prompt per adapter, written once under peft's bare key "prompt_embeddings"."""
        return {"prompt_embeddings": "prompt_embeddings"}

    def transform_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        ids, embeds = out.pop("input_ids", None), out.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise ValueError("prompt tuning rewrites input_ids or inputs_embeds, and the call passed neither as "
                                 "a keyword argument; call the model with input_ids=...")
            embeds = self.ops.module(ids)  # (B, T, d), the frozen base embedding
        b, n = embeds.shape[0], self.prompt_embeddings.shape[0]
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, n, d)
        out["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, d)
        prefixes = {"attention_mask": 1, "labels": IGNORE_INDEX, "token_type_ids": 0}
        for key, fill in prefixes.items():
            if out.get(key) is not None:
                out[key] = _prepend(out[key], n, fill)  # (B, n + T)
        if out.get("position_ids") is not None:
            pos = out["position_ids"]  # (B, T) or (1, T)
            head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], n)  # (B, n)
            out["position_ids"] = torch.cat([head, pos + n], dim=1)  # (B, n + T)
        return out


def _prepend(t: Tensor, n: int, fill: int) -> Tensor:
    if t.dim() != 2:
        raise ValueError(f"prompt tuning extends (batch, seq) tensors; got shape {tuple(t.shape)}")
    return torch.cat([t.new_full((t.shape[0], n), fill), t], dim=1)  # (B, n + T)


def _text_token_ids(config: PromptTuningConfig, n: int) -> list[int]:
    """The init text's token ids, repeated or truncated to n (peft's TEXT init); needs transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is an optional extra
        raise ConfigError("prompt_tuning_init", "'TEXT' needs transformers installed; use 'RANDOM'") from e
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint's config must not run remote code
    ids = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)(config.prompt_tuning_init_text)
    ids = list(ids["input_ids"])
    if not ids:
        raise ConfigError("prompt_tuning_init_text", "tokenizes to no tokens; give a non-empty text")
    return (ids * math.ceil(n / len(ids)))[:n]

