"""AdaLink: a low-rank residual module on the input embeddings (input-centric, the transformer untouched)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .lora import adapter_dtype

__all__ = ["AdaLinkConfig", "AdaLinkAdapter", "AdaLinkGeluAdapter"]

MAX_RANK = 65536


@register_config
@dataclass(frozen=True, kw_only=True)
class AdaLinkConfig(AdapterConfig):
    """AdaLink settings (peft_type "ADALINK"; the paper has no public code and peft no such method).

    target_modules: the input embedding of each modality, e.g. ["embed_tokens"] (Llama), ["wte"] (GPT-2),
    ["word_embeddings"] (BERT); an image modality targets the last projection of its vision connector. One
    AdaLink module (own A, B) per targeted layer; separate adapters per task. No architecture preset: required.
    r: rank (>= 1). use_gelu: e' = e + B gelu(A e) (method "adalink_gelu"; neither mergeable nor servable)
    instead of the linear form e' = e + B A e. init_weights: True = A kaiming-uniform, B = 0 (identity);
    False = B kaiming-uniform too (tests).
    """

    peft_type: ClassVar[str] = "ADALINK"
    method_name: ClassVar[str] = "adalink"

    r: int = 8
    use_gelu: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= MAX_RANK:
            raise ConfigError("r", f"rank must be an integer in [1, {MAX_RANK}], got {self.r!r}")
        for name in ("use_gelu", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.target_modules is None:
            raise ConfigError("target_modules", "AdaLink adapts input embeddings and has no preset; name them, e.g. "
                                                "['embed_tokens'] (Llama), ['wte'] (GPT-2), ['word_embeddings'] (BERT)")

    @property
    def method(self) -> str:
        return "adalink_gelu" if self.use_gelu else "adalink"


@register_adapter("adalink", AdaLinkConfig)
class AdaLinkAdapter(Adapter):
    """AdaLink (arXiv 2310.12100): e' = e + B A e for e = W x, the layer's output before any bias.

    On an embedding e is the looked-up row E[id]; on a Linear/Conv1D/convolution (a vision connector's last
    projection) e = W x and the bias is added after. A (r, d) acts on the layer's output space (d = out),
    B (d, r); A kaiming-uniform, B = 0, so the output equals the base at init. Computed as B (A W) x: A W is
    the layer-input-side factor (r, in), applied with the layer's own op (an embedding lookup for ids).
    Merge (fold): W' = (I + B A) W, i.e. for an embedding table E (num, d) with weight2d = E^T,
    E' = E + E A^T B^T; D = B A W is taken from the base at merge time (delta_reads_base).
    Lowered: LowRank(A W, B, 1), exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    delta_reads_base = True

    def __init__(self, ops: LayerOps, config: AdaLinkConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device, d = adapter_dtype(ops), ops.weight.device, ops.out_features
        self.adalink_A = self.new_param((config.r, d), dtype, device)  # (r, d)
        self.adalink_B = self.new_param(ops.b_shape(config.r), dtype, device)  # (d, r...)
        if initialize:
            nn.init.kaiming_uniform_(self.adalink_A, a=math.sqrt(5))
            if not config.init_weights:
                nn.init.kaiming_uniform_(self.adalink_B, a=math.sqrt(5))

    def input_factor(self) -> Tensor:
        """A W in the layer's a_shape (r, in...): A applied to the layer's output, seen from its input."""
        w = self.ops.weight2d().detach().to(self.adalink_A.dtype)  # (d, in_flat)
        return (self.adalink_A @ w).reshape(self.ops.a_shape(self.adalink_A.shape[0]))  # (r, in...)

    def hidden(self, x: Tensor) -> Tensor:
        """A e for e = W x: (..., r) (an embedding: (..., r) from a lookup in the (r, num) table A E^T)."""
        return self.ops.down(self.cast_input(x, self.adalink_A), self.input_factor())

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self.hidden(x), self.adalink_B)  # (..., d): B A e

    def delta_weight(self) -> Tensor:
        with torch.no_grad():
            a = self.ops.flat(self.input_factor()).float()  # (r, in_flat)
            return self.ops.flat(self.adalink_B).float() @ a  # (d, in_flat): B A W

    def lowered(self) -> LowRank | None:
        return LowRank(self.input_factor().detach(), self.adalink_B.detach(), 1.0)

    def disk_names(self) -> dict[str, str]:
        return {"adalink_A": "adalink_A", "adalink_B": "adalink_B"}


@register_adapter("adalink_gelu", AdaLinkConfig, config_defaults={"use_gelu": True})
class AdaLinkGeluAdapter(AdaLinkAdapter):
    """AdaLink, nonlinear form (arXiv 2310.12100, a "two-layer low-rank MLP"): e' = e + B gelu(A e).

    Same tensors and init as the linear form (B = 0: identity at init). The GELU stops the fold into the
    embedding table: neither mergeable nor servable.
    """

    capabilities = frozenset({"identity_at_init"})

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(F.gelu(self.hidden(x)), self.adalink_B)  # (..., d): B gelu(A e)

    def delta_weight(self) -> Tensor:
        return Adapter.delta_weight(self)  # MergeError: no 'mergeable' capability

    def lowered(self) -> LowRank | None:
        return None
