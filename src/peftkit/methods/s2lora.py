"""S2-LoRA: one LoRA pair shared by all same-shaped weight matrices, a sparse rank-coefficient vector per matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .common import adapter_dtype, check_alpha, check_rank

__all__ = ["S2LoraConfig", "S2LoraAdapter", "shape_key"]

INIT_STD = 0.02


@register_config
@dataclass(frozen=True, kw_only=True)
class S2LoraConfig(AdapterConfig):
    """S2-LoRA settings (peft_type "S2LORA"; not in peft).

    r: rank of the shared pairs. lora_alpha: s = lora_alpha / r. s2_l1: mu >= 0, weight of the L1 penalty
    mu * ||lambda_j||_1 per adapted matrix (returned by extra_losses as "s2lora_l1"; 0 turns it off).
    """

    peft_type: ClassVar[str] = "S2LORA"
    method_name: ClassVar[str] = "s2lora"

    r: int = 8
    lora_alpha: float = 16
    s2_l1: float = 1e-3

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        mu = self.s2_l1
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ConfigError("s2_l1", f"must be a finite number >= 0 (0 disables the L1 penalty), got {mu!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def shape_key(ops: LayerOps) -> str:
    """'<out>x<in...>' of the layer's factor geometry: layers with the same key share one (A, B) pair."""
    return "x".join(str(d) for d in (ops.out_features, *ops.a_shape(1)[1:]))


@register_adapter("s2lora", S2LoraConfig)
class S2LoraAdapter(Adapter):
    """S2-LoRA (arXiv 2309.11756): y = W_j x + b + s B diag(lambda_j) A x, s = alpha / r.

    A (r, in...) and B (out, r...) are one pair per distinct layer shape, shared by every layer of that shape
    (the same Parameter objects); lambda_j (r,) is the only per-layer tensor. Init: A, B ~ N(0, 0.02^2),
    lambda = 0 (identity at init). Loss extra: mu * ||lambda_j||_1. Merge: W'_j = W_j + s (B diag(lambda_j)) A.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: S2LoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.scaling = config.scaling
        self.key = shape_key(ops)
        shared = ctx.shared if ctx is not None else {}
        if self.key not in shared:
            shared[self.key] = (self._factor(ops.a_shape(config.r), dtype, device, initialize),
                                self._factor(ops.b_shape(config.r), dtype, device, initialize))
        self.s2lora_A, self.s2lora_B = shared[self.key]  # (r, in...), (out, r...): shared
        self.s2lora_lambda = self.new_param((config.r,), dtype, device)  # (r,), 0 at init

    @staticmethod
    def _factor(shape: tuple[int, ...], dtype, device, initialize: bool) -> nn.Parameter:
        t = torch.zeros(shape, dtype=dtype, device=device)
        if initialize:
            nn.init.normal_(t, 0.0, INIT_STD)
        return nn.Parameter(t)

    def scaled_b(self) -> Tensor:
        """B diag(lambda): lambda along B's rank axis."""
        b = self.s2lora_B
        return b * self.s2lora_lambda.reshape(1, -1, *([1] * (b.dim() - 2)))  # (out, r...)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(x, self.s2lora_A), self.s2lora_A) * self.scaling  # (..., r)
        return self.ops.up(h, self.scaled_b())  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(x, self.s2lora_A), self.s2lora_A) * self.scaling  # (..., r)
        return self.ops.up_add_(y, h, self.scaled_b())  # y += s B diag(lambda) A x

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return self.scaling * (flat(self.scaled_b()).float() @ flat(self.s2lora_A).float())  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.s2lora_A, self.scaled_b(), self.scaling)

    def extra_losses(self) -> dict[str, Tensor]:
        if self.config.s2_l1 == 0:
            return {}
        return {"s2lora_l1": self.config.s2_l1 * self.s2lora_lambda.abs().sum()}

    def disk_names(self) -> dict[str, str]:
        return {"s2lora_lambda": "s2lora_lambda"}

    def shared_disk_names(self) -> dict[str, str]:
        return {"s2lora_A": f"s2lora_A.{self.key}", "s2lora_B": f"s2lora_B.{self.key}"}
