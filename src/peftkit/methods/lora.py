"""LoRA: low-rank adaptation, with rsLoRA scaling, bias modes and the factor inits of `inits.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .common import MAX_RANK, adapter_dtype, check_alpha, check_rank, pattern_value
from .inits import init_factors, parse_init

__all__ = ["LoraConfig", "LoraAdapter", "MAX_RANK", "adapter_dtype"]

@register_config
@dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA / rsLoRA / DoRA settings, with peft's field names.

    r: rank (>= 1). lora_alpha: scale numerator; s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    lora_dropout: dropout on the adapter input. init_lora_weights: True (A kaiming, B zero), False, "gaussian",
    "pissa", "pissa_niter_<k>", "olora", "nlora", "lora_ga" (method "lora_ga": factors from calibration gradients,
    tuned by lora_ga_config = {"direction", "scale", "stable_gamma"}, peft's LoraGAConfig fields).
    rank_pattern / alpha_pattern: per-module r / alpha by regex suffix. lora_bias: B gets a trainable bias.
    use_dora: weight-decomposed LoRA (method "dora"). kasa_config: {"beta", "gamma"} selects KaSA (method "kasa").
    fan_in_fan_out: accepted for compatibility; Conv1D layers are detected by type.
    """

    peft_type: ClassVar[str] = "LORA"
    method_name: ClassVar[str] = "lora"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    lora_ga_config: dict | None = None
    kasa_config: dict | None = None

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        for key, value in self.rank_pattern.items():
            check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_alpha(f"alpha_pattern[{key!r}]", value)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        parse_init(self.init_lora_weights)

    def for_module(self, name: str) -> LoraConfig:
        r = pattern_value(self.rank_pattern, name, self.r)
        alpha = pattern_value(self.alpha_pattern, name, self.lora_alpha)
        return self if (r, alpha) == (self.r, self.lora_alpha) else self.replace(r=r, lora_alpha=alpha)

    def for_original_base(self) -> LoraConfig:
        """Rank doubles (see LoraAdapter.state_for_original_base); alpha follows so that s is unchanged."""
        grow = math.sqrt(2) if self.use_rslora else 2
        r, alpha = 2 * self.r, self.lora_alpha * grow
        rank = {k: 2 * v for k, v in self.rank_pattern.items()}
        keys = set(self.rank_pattern) | set(self.alpha_pattern)
        alphas = {k: self.alpha_pattern.get(k, self.lora_alpha) * grow for k in keys}
        return self.replace(r=r, lora_alpha=alpha, rank_pattern=rank, alpha_pattern=alphas, init_lora_weights=True,
                            lora_ga_config=None)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@register_adapter("lora", LoraConfig)
class LoraAdapter(Adapter):
    """LoRA (arXiv 2106.09685; rsLoRA arXiv 2312.03732): y = W x + b + s * B A drop(x).

    s = alpha / r (rsLoRA: alpha / sqrt(r)). A: (r, in...), B: (out, r...) in the layer's geometry.
    Merge: W' = W + s * B @ A, exact to rounding.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: LoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        r, dtype, device = config.r, adapter_dtype(ops), ops.weight.device
        self.scaling = config.scaling
        self.lora_A = self.new_param(ops.a_shape(r), dtype, device)
        self.lora_B = self.new_param(ops.b_shape(r), dtype, device)
        self.lora_B_bias = self.new_param((ops.out_features,), dtype, device) if config.lora_bias else None
        use_dropout = config.lora_dropout > 0 and ops.kind != "embedding"
        self.dropout = nn.Dropout(config.lora_dropout) if use_dropout else nn.Identity()
        if initialize:
            self._initialize(config)

    def _initialize(self, config: LoraConfig) -> None:
        w = self.ops.weight2d()
        a, b, taken = init_factors(config.init_lora_weights, w, config.r, self.scaling, self.ops.kind == "embedding")
        with torch.no_grad():
            self.lora_A.copy_(a.reshape(self.lora_A.shape))  # (r, in...)
            self.lora_B.copy_(b.reshape(self.lora_B.shape))  # (out, r...)
        if taken is not None:
            self.init_delta = taken  # (out, in_flat): the base gives this up; see core.host.AdaptedLayer.add
            self.register_buffer("init_A", self.lora_A.detach().clone(), persistent=False)
            self.register_buffer("init_B", self.lora_B.detach().clone(), persistent=False)

    def project(self, x: Tensor) -> Tensor:
        """s * A x for an already dropped-out input: the scale goes on the rank-r side, the cheap one."""
        return self.ops.down(self.cast_input(x, self.lora_A), self.lora_A) * self.scaling  # (..., r)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        y = self.ops.up(self.project(self.dropout(x)), self.lora_B)  # (..., out)
        if self.lora_B_bias is not None:
            y = y + self.ops.channel(self.lora_B_bias) * self.scaling
        return y

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        if self.lora_B_bias is not None:
            return super().add_to(y, x, z)
        return self.ops.up_add_(y, self.project(self.dropout(x)), self.lora_B)  # y += s B A drop(x), one GEMM

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return self.scaling * (flat(self.lora_B).float() @ flat(self.lora_A).float())  # (out, in_flat)

    def merged_bias(self, bias: Tensor | None, sign: int) -> Tensor | None:
        if self.lora_B_bias is None:
            return None
        if bias is None:
            raise ConfigError("lora_bias", "merging needs a base layer with a bias; this layer has none")
        return bias + sign * self.scaling * self.lora_B_bias.detach().to(bias.dtype)

    def lowered(self) -> LowRank:
        return LowRank(self.lora_A, self.lora_B, self.scaling)

    def disk_names(self) -> dict[str, str]:
        if self.ops.kind == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        return names | ({"lora_B_bias": "lora_B.bias"} if self.lora_B_bias is not None else {})

    def optional_disk_names(self) -> dict[str, tuple[int, ...]]:
        """Starting factors of a base-mutating init ("<A key>.init", "<B key>.init"): peftkit writes them so that
        loading onto the original base takes the same part of W again; peft's files lack them (residual base)."""
        a, b = (self.disk_names()[k].removesuffix(".weight") + ".init" for k in ("lora_A", "lora_B"))
        return {a: tuple(self.lora_A.shape), b: tuple(self.lora_B.shape)}

    def optional_state(self) -> dict[str, Tensor]:
        has_init = self.init_delta is not None and hasattr(self, "init_A")
        return dict(zip(self.optional_disk_names(), (self.init_A, self.init_B), strict=True)) if has_init else {}

    def load_optional(self, tensors: dict[str, Tensor]) -> None:
        a, b = (tensors.get(k) for k in self.optional_disk_names())
        if a is not None and b is not None:
            self.register_buffer("init_A", a.to(self.lora_A), persistent=False)
            self.register_buffer("init_B", b.to(self.lora_B), persistent=False)
            self.init_delta = self.scaling * (self.ops.flat(b).float() @ self.ops.flat(a).float())  # (out, in_flat)

    def state_for_original_base(self) -> dict[str, Tensor] | None:
        """W_res + s B_t A_t = W + s [B_t, -B_0] [A_t; A_0]: a plain rank-2r LoRA on the original weight."""
        if self.init_delta is None:
            return None
        a = torch.cat([self.lora_A.detach(), self.init_A], dim=0)  # (2r, in...)
        b = torch.cat([self.lora_B.detach(), -self.init_B], dim=1)  # (out, 2r...)
        return {"lora_A": a, "lora_B": b}
