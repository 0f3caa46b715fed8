"""SURM: structured unrestricted-rank matrices (circulant, Toeplitz, Kronecker) as the additive update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype

__all__ = ["SurmConfig", "SurmAdapter", "STRUCTURES"]

STRUCTURES = ("circulant", "toeplitz", "kronecker")


@register_config
@dataclass(frozen=True, kw_only=True)
class SurmConfig(AdapterConfig):
    """SURM settings (peft_type "SURM"; peft has no such method).

    surm_structure: "circulant" | "toeplitz" | "kronecker". surm_alpha: the scale s of the update s * S.
    surm_kron_shape: (a, b), the shape of the Kronecker factor P; Q is (out/a, in/b). None = per layer, the
    largest divisors a of out and b of in with a^2 <= out, b^2 <= in (balanced factors, fewest parameters).
    surm_dropout: dropout on the adapter input. init_weights: True = S = 0 at init (c = 0, t = 0, P = 0 with Q
    random); False = every tensor random (for tests).
    """

    peft_type: ClassVar[str] = "SURM"
    method_name: ClassVar[str] = "surm"

    surm_structure: str = "circulant"
    surm_alpha: float = 1.0
    surm_kron_shape: tuple[int, int] | None = None
    surm_dropout: float = 0.0
    init_weights: bool = True

    def validate(self) -> None:
        if self.surm_structure not in STRUCTURES:
            raise ConfigError("surm_structure", f"must be one of {STRUCTURES}, got {self.surm_structure!r}")
        a = self.surm_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ConfigError("surm_alpha", f"must be a finite number > 0, got {a!r}")
        if not (isinstance(self.surm_dropout, (int, float)) and 0 <= self.surm_dropout < 1):
            raise ConfigError("surm_dropout", f"must be in [0, 1), got {self.surm_dropout!r}")
        shape = self.surm_kron_shape
        if shape is not None:
            ok = isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
            if not ok:
                raise ConfigError("surm_kron_shape", f"must be None or two positive integers (a, b), got {shape!r}")
            self._set("surm_kron_shape", tuple(shape))


def _balanced(n: int) -> int:
    """The largest divisor d of n with d * d <= n."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def _uniform(shape: tuple[int, ...], fan_in: int, like: Tensor) -> Tensor:
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


@register_adapter("surm", SurmConfig)
class SurmAdapter(Adapter):
    """SURM (arXiv 2406.17740): y = W x + b + s * S drop(x), S structured with unrestricted rank.

    Circulant/Toeplitz: S is a (out/g) x (in/g) grid of g x g blocks, g = gcd(out, in), block (i, j) with its own
    generator v_ij: circulant C_ab = v[(a - b) mod g] (g values), Toeplitz T_ab = v[a - b + g - 1] (2g - 1 values,
    applied as a 2g circulant on the zero-padded input). Forward by FFT: C x = irfft(rfft(v) * rfft(x)).
    Kronecker: S = P (a, b) kron Q (out/a, in/b), applied as P X Q^T on x reshaped to (b, in/b).
    Merge: W' = W + s * S materialized (the dense slow twin), exact.
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: SurmConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"surm supports Linear and Conv1D layers, not {ops.kind!r}")
        n_out, n_in, dtype, device = ops.out_features, ops.in_features, adapter_dtype(ops), ops.weight.device
        self.structure, self.scaling = config.surm_structure, config.surm_alpha
        self.g = math.gcd(n_out, n_in)
        if self.structure == "kronecker":
            a, b = self._kron_shape(config, ctx)
            self.surm_P = self.new_param((a, b), dtype, device)  # (a, b)
            self.surm_Q = self.new_param((n_out // a, n_in // b), dtype, device)  # (out/a, in/b)
        else:
            length = self.g if self.structure == "circulant" else 2 * self.g - 1
            self.surm_weight = self.new_param((n_out // self.g, n_in // self.g, length), dtype, device)  # (p, q, L)
        self.dropout = nn.Dropout(config.surm_dropout) if config.surm_dropout > 0 else nn.Identity()
        if initialize:
            self._initialize(config.init_weights)

    def _kron_shape(self, config: SurmConfig, ctx: AdapterContext | None) -> tuple[int, int]:
        n_out, n_in = self.ops.out_features, self.ops.in_features
        a, b = config.surm_kron_shape or (_balanced(n_out), _balanced(n_in))
        if n_out % a or n_in % b:
            raise ConfigError("surm_kron_shape", f"{ctx.path if ctx else 'layer'}: (a, b) = ({a}, {b}) must divide "
                                                 f"(out_features, in_features) = ({n_out}, {n_in}); choose divisors or "
                                                 "None for a per-layer balanced shape")
        return a, b

    @torch.no_grad()
    def _initialize(self, zero: bool) -> None:
        """S = 0 at init: c = 0 / t = 0 / P = 0 (Q kaiming-uniform). zero=False: all random."""
        if self.structure == "kronecker":
            q = self.surm_Q
            q.copy_(_uniform(q.shape, q.shape[1], q))
            self.surm_P.copy_(torch.zeros_like(self.surm_P) if zero else _uniform(self.surm_P.shape, 1, q))
        elif not zero:
            self.surm_weight.copy_(_uniform(self.surm_weight.shape, self.ops.in_features, self.surm_weight))

    def _circulant_columns(self) -> Tensor:
        """First columns of the circulants to apply: (p, q, g), or the 2g circulant embedding a Toeplitz block."""
        v = self.surm_weight  # (p, q, L)
        if self.structure == "circulant":
            return v
        g = self.g
        return torch.cat([v[..., g - 1:], v.new_zeros(*v.shape[:2], 1), v[..., :g - 1]], dim=-1)  # (p, q, 2g)

    def apply_structured(self, x: Tensor) -> Tensor:
        """S x for x (N, in) without materializing S: FFT for circulant/Toeplitz, P X Q^T for Kronecker."""
        n = x.shape[0]
        if self.structure == "kronecker":
            a, b = self.surm_P.shape
            t = x.reshape(n, b, -1) @ self.surm_Q.T  # (N, b, out/a)
            return torch.einsum("ij,njk->nik", self.surm_P, t).reshape(n, -1)  # (N, out)
        col = self._circulant_columns()  # (p, q, L')
        size = col.shape[-1]
        xf = torch.fft.rfft(x.reshape(n, col.shape[1], self.g), n=size)  # (N, q, F), zero-padded for Toeplitz
        yf = torch.einsum("pqf,nqf->npf", torch.fft.rfft(col, n=size), xf)  # (N, p, F)
        return torch.fft.irfft(yf, n=size)[..., :self.g].reshape(n, -1)  # (N, out)

    def dense(self) -> Tensor:
        """S materialized (out, in): the slow twin of apply_structured, used by merge."""
        if self.structure == "kronecker":
            return torch.kron(self.surm_P, self.surm_Q)  # (out, in)
        g, v = self.g, self.surm_weight
        idx = torch.arange(g, device=v.device)[:, None] - torch.arange(g, device=v.device)[None, :]  # (g, g): a - b
        idx = idx % g if self.structure == "circulant" else idx + g - 1
        blocks = v[..., idx]  # (p, q, g, g)
        return blocks.permute(0, 2, 1, 3).reshape(self.ops.out_features, self.ops.in_features)  # (out, in)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        p = self.surm_P if self.structure == "kronecker" else self.surm_weight
        xd = self.dropout(self.cast_input(x, p))
        y = self.apply_structured(xd.reshape(-1, x.shape[-1]))  # (N, out)
        return (y * self.scaling).reshape(*x.shape[:-1], -1)

    def delta_weight(self) -> Tensor:
        return self.scaling * self.dense().float()  # (out, in)
