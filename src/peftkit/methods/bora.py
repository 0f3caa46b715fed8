"""BoRA: bi-dimensional weight-decomposed LoRA, trainable magnitudes for both the rows and the columns of W."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .inits import parse_init
from .lora import LoraAdapter, LoraConfig

__all__ = ["BoraConfig", "BoraAdapter", "bora_weight"]

SUPPORTED_KINDS = ("linear", "conv1d_transposed")
SUPPORTED_INITS = ("True", "False", "gaussian")  # inits that leave the base weight alone


@register_config
@dataclass(frozen=True, kw_only=True)
class BoraConfig(LoraConfig):
    """BoRA settings: LoRA's fields (r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, rank_pattern,
    alpha_pattern, target_modules, ...). use_dora, lora_bias and base-mutating inits (pissa, olora, nlora) are
    refused: BoRA's magnitudes are taken from the unchanged base weight."""

    peft_type: ClassVar[str] = "BORA"
    method_name: ClassVar[str] = "bora"

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ConfigError("use_dora", "BoRA already decomposes the weight; set use_dora=False")
        if self.lora_bias:
            raise ConfigError("lora_bias", "BoRA has no bias on B; set lora_bias=False")
        if parse_init(self.init_lora_weights)[0] not in SUPPORTED_INITS:
            raise ConfigError("init_lora_weights", f"{self.init_lora_weights!r} changes the base weight, which BoRA's "
                                                   "magnitudes are taken from; use True, False or 'gaussian'")

    def for_original_base(self) -> BoraConfig:
        return self  # BoRA never changes the base weight


def _safe(n: Tensor) -> Tensor:
    """A detached norm with zeros lifted to the smallest normal number (a zero row/column stays zero)."""
    return n.detach().clamp_min(torch.finfo(n.dtype).tiny)


def bora_weight(w: Tensor, a: Tensor, b: Tensor, s: float, m_r: Tensor, m_c: Tensor) -> Tensor:
    """W' = R diag(m_c / ||R||_col), R = diag(m_r / ||V||_row) V, V = W + s B A; both norms detached.

    w: (out, in), a: (r, in), b: (out, r), m_r: (out,), m_c: (in,). Returns (out, in).
    """
    v = w + s * (b @ a)  # (out, in)
    r = v * (m_r / _safe(torch.linalg.vector_norm(v.detach(), dim=1)))[:, None]  # (out, in)
    return r * (m_c / _safe(torch.linalg.vector_norm(r.detach(), dim=0)))[None, :]  # (out, in)


@register_adapter("bora", BoraConfig)
class BoraAdapter(LoraAdapter):
    """BoRA (arXiv 2412.06441): y = W' x + b, W' = diag(m_r/||V||_row) V diag(m_c/||R||_col), V = W + s B A.

    R = diag(m_r/||V||_row) V is the row step; ||V||_row and ||R||_col are detached (as DoRA's norm). A, B, m_r
    (out,) and m_c (in,) train; m_r = ||W||_row and m_c = ||W||_col at init, so W' = W exactly. The contribution
    is (W' - W) drop(x) with W' materialized (two normalizations have no factored form).
    Merge: D = W' - W computed from the base at merge time (delta_reads_base: the host keeps D for unmerge).
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})
    delta_reads_base = True

    def __init__(self, ops: LayerOps, config: BoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind not in SUPPORTED_KINDS:
            raise UnsupportedLayerError(f"BoRA supports Linear and Conv1D layers, not {ops.kind}")
        super().__init__(ops, config, initialize, ctx)
        out_f, in_f, dtype = ops.out_features, ops.in_features, self.lora_A.dtype
        self.bora_magnitude_row = nn.Parameter(torch.zeros(out_f, dtype=dtype, device=self.lora_A.device))
        self.bora_magnitude_col = nn.Parameter(torch.zeros(in_f, dtype=dtype, device=self.lora_A.device))
        if initialize:
            w = self._base()  # the same tensor layout the forward normalizes, so m/n = 1 exactly at init
            with torch.no_grad():
                self.bora_magnitude_row.copy_(torch.linalg.vector_norm(w, dim=1))  # (out,)
                self.bora_magnitude_col.copy_(torch.linalg.vector_norm(w, dim=0))  # (in,)
        self._cache: tuple[tuple, Tensor] | None = None

    def _base(self) -> Tensor:
        return self.ops.weight2d().detach().to(self.lora_A.dtype).contiguous()  # (out, in)

    def adapted_weight(self) -> Tensor:
        """W' (out, in) in the adapter dtype, differentiable in A, B, m_r and m_c."""
        return bora_weight(self._base(), self.lora_A, self.lora_B, self.scaling,
                           self.bora_magnitude_row, self.bora_magnitude_col)

    def _delta(self) -> Tensor:
        """W' - W (out, in); without grad it is cached until a tensor it reads changes (decoding)."""
        if torch.is_grad_enabled():
            return self.adapted_weight() - self._base()
        tensors = (self.lora_A, self.lora_B, self.bora_magnitude_row, self.bora_magnitude_col, self.ops.weight)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.adapted_weight() - self._base())
        return self._cache[1]

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return F.linear(self.cast_input(self.dropout(x), self.lora_A), self._delta())  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return y + self.forward(x, z).to(y.dtype)  # not LoraAdapter.add_to, which adds the plain LoRA term

    def delta_weight(self) -> Tensor:
        with torch.no_grad():
            return (self.adapted_weight() - self._base()).float()  # (out, in)

    def lowered(self) -> None:
        return None

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"bora_magnitude_row": "bora_magnitude_row",
                                       "bora_magnitude_col": "bora_magnitude_col"}
