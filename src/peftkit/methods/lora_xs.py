"""LoRA-XS: frozen SVD factors of W with one trainable r x r matrix between them (arXiv 2405.17604)."""

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

__all__ = ["LoraXsConfig", "LoraXsAdapter"]


@register_config
@dataclass(frozen=True, kw_only=True)
class LoraXsConfig(AdapterConfig):
    """r: rank (R is r x r). lora_alpha: s = lora_alpha / r. lora_dropout: dropout on the adapter input.
    init_std: R ~ N(0, init_std^2) (paper: 1e-5; 0 gives an exact identity at init)."""

    peft_type: ClassVar[str] = "LORA_XS"
    method_name: ClassVar[str] = "lora_xs"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_std: float = 1e-5

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        std = self.init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
            raise ConfigError("init_std", f"must be a finite number >= 0, got {std!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@register_adapter("lora_xs", LoraXsConfig)
class LoraXsAdapter(Adapter):
    """LoRA-XS (arXiv 2405.17604): y = W x + b + s * B R A drop(x), only R (r, r) trains.

    B = U_r (out, r) and A = S_r V_r^T (r, in...) are frozen persistent buffers from the truncated SVD of W
    (full torch.linalg.svd in fp32, deterministic; the authors use sklearn's randomized TruncatedSVD). R starts
    at N(0, init_std^2), so the output moves by O(init_std * |x|) at init. Merge: W' = W + s * B R A, exact.
    Serving: the LoRA form (A, B R, s).
    """

    capabilities = frozenset({"mergeable", "servable"})

    def __init__(self, ops: LayerOps, config: LoraXsConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        r, dtype, device = config.r, adapter_dtype(ops), ops.weight.device
        if r > min(ops.out_features, ops.in_features):
            raise ConfigError("r", f"r={r} exceeds min(out, in)={min(ops.out_features, ops.in_features)} of a "
                                   "target layer; lower r")
        self.scaling = config.scaling
        self.register_buffer("lora_xs_A", torch.zeros(ops.a_shape(r), dtype=dtype, device=device))  # (r, in...)
        self.register_buffer("lora_xs_B", torch.zeros(ops.b_shape(r), dtype=dtype, device=device))  # (out, r...)
        self.lora_xs_R = self.new_param((r, r), dtype, device)  # (r, r)
        self._r_shape = (r, *ops.b_shape(r)[1:])  # R as an "up" factor (r, r...) in the layer's geometry
        use_dropout = config.lora_dropout > 0 and ops.kind != "embedding"
        self.dropout = nn.Dropout(config.lora_dropout) if use_dropout else nn.Identity()
        if initialize:
            self._initialize(config)

    def _initialize(self, config: LoraXsConfig) -> None:
        w = self.ops.weight2d().detach().float()  # (out, in_flat)
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (out, m), (m,), (m, in_flat)
        r = config.r
        with torch.no_grad():
            self.lora_xs_B.copy_(u[:, :r].reshape(self.lora_xs_B.shape))  # (out, r...)
            self.lora_xs_A.copy_((sv[:r, None] * vh[:r]).reshape(self.lora_xs_A.shape))  # (r, in...)
            self.lora_xs_R.normal_(0.0, config.init_std)  # (r, r)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(self.dropout(x), self.lora_xs_A), self.lora_xs_A)  # (..., r)
        h = self.ops.up(h, self.lora_xs_R.reshape(self._r_shape)) * self.scaling  # (..., r): s R A x
        return self.ops.up(h, self.lora_xs_B)  # (..., out)

    def _b_times_r(self) -> Tensor:
        return (self.ops.flat(self.lora_xs_B) @ self.lora_xs_R).reshape(self.lora_xs_B.shape)  # (out, r...)

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return self.scaling * (flat(self._b_times_r()).float() @ flat(self.lora_xs_A).float())  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.lora_xs_A, self._b_times_r(), self.scaling)

    def disk_names(self) -> dict[str, str]:
        return {"lora_xs_A": "lora_xs_A", "lora_xs_B": "lora_xs_B", "lora_xs_R": "lora_xs_R"}
