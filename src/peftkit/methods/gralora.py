"""GraLoRA: granular low-rank adaptation, a k x k grid of blocks each with its own rank-(r/k) adapter."""

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
from ..errors import ConfigError, UnsupportedLayerError
from .common import MAX_RANK, adapter_dtype

__all__ = ["GraloraConfig", "GraloraAdapter"]


@register_config
@dataclass(frozen=True, kw_only=True)
class GraloraConfig(AdapterConfig):
    """GraLoRA settings, with peft's field names (peft_type "GRALORA").

    r: GraLoRA rank (divisible by gralora_k); parameters r * (in + out) like rank-r LoRA. alpha: scale numerator,
    s = alpha / (r + hybrid_r). gralora_dropout: dropout on the adapter input. gralora_k: blocks per side (in and
    out must be divisible by it). hybrid_r: rank of an extra plain LoRA (0 = none). init_weights: True = A
    kaiming-uniform, B zero (identity at init); False = B kaiming-uniform too (for tests).
    fan_in_fan_out: accepted for compatibility; Conv1D layers are detected by type.
    """

    peft_type: ClassVar[str] = "GRALORA"
    method_name: ClassVar[str] = "gralora"

    r: int = 32
    alpha: float = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    hybrid_r: int = 0
    init_weights: bool = True
    fan_in_fan_out: bool = False

    def validate(self) -> None:
        for name, low in (("r", 1), ("gralora_k", 1), ("hybrid_r", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_RANK:
                raise ConfigError(name, f"must be an integer in [{low}, {MAX_RANK}], got {value!r}")
        if self.r % self.gralora_k:
            raise ConfigError("gralora_k", f"r={self.r} must be divisible by gralora_k={self.gralora_k}; "
                                           "choose r as a multiple of gralora_k")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ConfigError("alpha", f"must be a finite number > 0, got {a!r}")
        if not (isinstance(self.gralora_dropout, (int, float)) and 0 <= self.gralora_dropout < 1):
            raise ConfigError("gralora_dropout", f"must be in [0, 1), got {self.gralora_dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


def _kaiming(shape: tuple[int, ...], fan_in: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)


@register_adapter("gralora", GraloraConfig)
class GraloraAdapter(Adapter):
    """GraLoRA (arXiv 2505.20355): y = W x + b + s * (dW_grid + B_h A_h) drop(x), s = alpha / (r + hybrid_r).

    Input chunk n (in/k wide) and output chunk j (out/k wide); A_n = gralora_A[n] (in/k, r), B_j = gralora_B[j]
    (r, out/k), both with the rank axis split in k chunks of r/k. Block (j, n) of dW_grid is
    B_j[chunk n]^T A_n[:, chunk j]^T, of rank <= r/k; dW_grid reaches rank k * r. Layout and math as peft's.
    Merge: W' = W + s * (dW_grid + B_h A_h), exact.
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: GraloraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"gralora supports Linear and Conv1D layers, not {ops.kind!r}")
        k, r, rh, dtype, device = config.gralora_k, config.r, config.hybrid_r, adapter_dtype(ops), ops.weight.device
        n_in, n_out = ops.in_features, ops.out_features
        if n_in % k or n_out % k:
            raise ConfigError("gralora_k", f"{ctx.path if ctx else 'layer'}: in_features={n_in} and out_features="
                                           f"{n_out} must both be divisible by gralora_k={k}; exclude this module "
                                           "or choose another gralora_k")
        self.k, self.r, self.scaling = k, r, config.scaling
        self.gralora_A = self.new_param((k, n_in // k, r), dtype, device)  # (k, in/k, r)
        self.gralora_B = self.new_param((k, r, n_out // k), dtype, device)  # (k, r, out/k)
        self.gralora_A_general = self.new_param((rh, n_in), dtype, device) if rh else None  # (rh, in)
        self.gralora_B_general = self.new_param((n_out, rh), dtype, device) if rh else None  # (out, rh)
        self.dropout = nn.Dropout(config.gralora_dropout) if config.gralora_dropout > 0 else nn.Identity()
        if initialize:
            self._initialize(config.init_weights)

    @torch.no_grad()
    def _initialize(self, zero_b: bool) -> None:
        """peft's init: each A_n (r, in/k) kaiming-uniform, B zero (or kaiming-uniform over fan_in r)."""
        a, b = self.gralora_A, self.gralora_B
        a.copy_(_kaiming(a.shape, a.shape[1], a.dtype, a.device))
        b.copy_(torch.zeros_like(b) if zero_b else _kaiming(b.shape, self.r, b.dtype, b.device))
        if self.gralora_A_general is not None:
            ag, bg = self.gralora_A_general, self.gralora_B_general
            ag.copy_(_kaiming(ag.shape, ag.shape[1], ag.dtype, ag.device))
            bg.copy_(torch.zeros_like(bg) if zero_b else _kaiming(bg.shape, bg.shape[1], bg.dtype, bg.device))

    def _grid(self, x: Tensor) -> Tensor:
        """dW_grid x for x (N, in): out_j = sum_n B_j[chunk n]^T (A_n^T x_n)[chunk j]."""
        k, rk = self.k, self.r // self.k
        u = torch.einsum("nki,kir->nkr", x.reshape(x.shape[0], k, -1), self.gralora_A)  # (N, k_in, r)
        u = u.reshape(x.shape[0], k, k, rk).transpose(1, 2).reshape(x.shape[0], k, self.r)  # (N, k_out, r)
        return torch.einsum("njr,jro->njo", u, self.gralora_B).reshape(x.shape[0], -1)  # (N, out)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        lead = x.shape[:-1]
        xd = self.dropout(self.cast_input(x, self.gralora_A)).reshape(-1, x.shape[-1])  # (N, in)
        y = self._grid(xd)  # (N, out)
        if self.gralora_A_general is not None:
            y = y + (xd @ self.gralora_A_general.T) @ self.gralora_B_general.T  # (N, out)
        return (y * self.scaling).reshape(*lead, -1)

    def delta_weight(self) -> Tensor:
        k, rk = self.k, self.r // self.k
        a = self.gralora_A.float().reshape(k, -1, k, rk)  # (k_in n, in/k i, k_out j, r/k c)
        b = self.gralora_B.float().reshape(k, k, rk, -1)  # (k_out j, k_in n, r/k c, out/k o)
        d = torch.einsum("jnco,nijc->joni", b, a).reshape(self.ops.out_features, -1)  # (out, in)
        if self.gralora_A_general is not None:
            d = d + self.gralora_B_general.float() @ self.gralora_A_general.float()  # (out, in)
        return self.scaling * d

    @torch.no_grad()
    def lowered(self) -> LowRank:
        """The exact plain form of rank k * r + hybrid_r: one rank-(r/k) factor pair per block, zero elsewhere."""
        k, rk, n_in, n_out = self.k, self.r // self.k, self.ops.in_features, self.ops.out_features
        a = self.gralora_A.reshape(k, n_in // k, k, rk)  # (n, i, j, c)
        b = self.gralora_B.reshape(k, k, rk, n_out // k)  # (j, n, c, o)
        eye = torch.eye(k, dtype=a.dtype, device=a.device)  # places block n of A / block j of B
        big_a = torch.einsum("nijc,nm->jncmi", a, eye).reshape(k * self.r, n_in)  # (k r, in)
        big_b = torch.einsum("jnco,jm->mojnc", b, eye).reshape(n_out, k * self.r)  # (out, k r)
        if self.gralora_A_general is not None:
            big_a = torch.cat([big_a, self.gralora_A_general], dim=0)  # (k r + rh, in)
            big_b = torch.cat([big_b, self.gralora_B_general], dim=1)  # (out, k r + rh)
        return LowRank(big_a, big_b, self.scaling)

    def disk_names(self) -> dict[str, str]:
        names = {"gralora_A": "gralora_A", "gralora_B": "gralora_B"}
        if self.gralora_A_general is not None:
            names |= {"gralora_A_general": "gralora_A_general.weight", "gralora_B_general": "gralora_B_general.weight"}
        return names
