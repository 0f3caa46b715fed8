"""SALT: scale and shift the top singular values of W, plus a low-rank update on the rest of its spectrum.

Paper: Elsayed et al., "SALT: Singular Value Adaptation with Low-Rank Transformation", arXiv 2503.16055
(reference code BioMedIA-MBZUAI/SALT, `prompt_adapted_SAM2/modeling/Adapters/SALT.py`).
"""

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
from .common import adapter_dtype, check_rank
from .svft import canonical_svd, check_sigma

__all__ = ["SaltConfig", "SaltAdapter", "salt_sizes"]


def salt_sizes(k: int, ratio: float, r: int) -> tuple[int, int]:
    """(t, r_l): t = max(1, floor(ratio k)) top values scaled and shifted, at most k - 1 so a tail remains;
    r_l = min(r, k - t), the rank of X Y on the (k - t) x (k - t) tail block."""
    t = min(max(1, math.floor(ratio * k)), k - 1)
    return t, min(r, k - t)


@register_config
@dataclass(frozen=True, kw_only=True)
class SaltConfig(AdapterConfig):
    """r: rank r_l of the tail update X Y (reference 256; clamped to k - t per layer). ratio: share of the k
    singular values that get a trainable scale and shift, t = max(1, floor(ratio k)), in (0, 1).
    reg_multiplier: weight of the regularizer ||a*sigma + c - sigma|| + ||X Y||_F (reference 0 = off).
    """

    peft_type: ClassVar[str] = "SALT"
    method_name: ClassVar[str] = "salt"

    r: int = 256
    ratio: float = 0.1
    reg_multiplier: float = 0.0

    def validate(self) -> None:
        check_rank("r", self.r)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ConfigError("ratio", f"must be a number in (0, 1) (reference 0.1), got {self.ratio!r}")
        reg = self.reg_multiplier
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg < 0:
            raise ConfigError("reg_multiplier", f"must be a finite number >= 0 (0 = off), got {reg!r}")


@register_adapter("salt", SaltConfig)
class SaltAdapter(Adapter):
    """SALT (arXiv 2503.16055): W' = U ReLU(S') V^T with W = U S V^T (full thin SVD, k = min(out, in)),

        S' = [[diag(a * sigma_top + c), 0], [0, diag(sigma_tail) + X Y]]     (k x k; ReLU elementwise)

    computed as the contribution U (ReLU(S') - S) V^T x added to the untouched base output. a (t,) = 1, c (t,) = 0,
    X (k-t, r_l) ~ kaiming-uniform(a=sqrt 20), Y (r_l, k-t) = 0: the output equals the base at init. U and V^T
    are recomputed from the base at load time (sign-canonical SVD, not saved); sigma (k,) is saved and checked.
    Merge: W' = W + U (ReLU(S') - S) V^T, exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: SaltConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device = adapter_dtype(ops), ops.weight.device
        k = min(ops.out_features, ops.in_features)
        if k < 2:
            raise UnsupportedLayerError(f"SALT needs min(out, in) >= 2 (a top block and a tail); got {k}")
        t, rl = salt_sizes(k, config.ratio, config.r)
        self.t = t
        self.register_buffer("salt_U", torch.zeros(ops.b_shape(k), dtype=dtype, device=device), persistent=False)
        self.register_buffer("salt_V", torch.zeros(ops.a_shape(k), dtype=dtype, device=device), persistent=False)
        self.register_buffer("salt_sigma", torch.zeros(k, dtype=dtype, device=device))  # (k,)
        self.salt_scale = nn.Parameter(torch.ones(t, dtype=dtype, device=device))  # (t,) a
        self.salt_shift = self.new_param((t,), dtype, device)  # (t,) c
        self.salt_X = self.new_param((k - t, rl), dtype, device)  # (k-t, r_l)
        self.salt_Y = self.new_param((rl, k - t), dtype, device)  # (r_l, k-t)
        self._core_shape = (k, k, *ops.b_shape(k)[2:])  # the k x k core as an "up" factor in the layer geometry
        if initialize:
            s = self._factorize()
            with torch.no_grad():
                self.salt_sigma.copy_(s)  # (k,)
                nn.init.kaiming_uniform_(self.salt_X, a=math.sqrt(20))

    @torch.no_grad()
    def _factorize(self) -> Tensor:
        """Fill U (out, k) and V^T (k, in...) from the current base weight; returns its singular values (k,)."""
        u, s, vh = canonical_svd(self.ops.weight2d())
        self.salt_U.copy_(u.reshape(self.salt_U.shape))  # (out, k...)
        self.salt_V.copy_(vh.reshape(self.salt_V.shape))  # (k, in...)
        return s

    def after_load(self) -> None:
        """The factors are not saved: recompute them from the base, after checking it is the saved one."""
        check_sigma(self.salt_sigma, self._factorize(), "SALT")

    def core(self) -> Tensor:
        """ReLU(S') - S, (k, k): diagonal on the top block, dense on the tail block, zero elsewhere."""
        s, t = self.salt_sigma, self.t
        top = torch.relu(self.salt_scale * s[:t] + self.salt_shift) - s[:t]  # (t,)
        tail = torch.relu(torch.diag(s[t:]) + self.salt_X @ self.salt_Y) - torch.diag(s[t:])  # (k-t, k-t)
        return torch.block_diag(torch.diag(top), tail)  # (k, k)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(x, self.salt_V), self.salt_V)  # (..., k): V^T x
        h = self.ops.up(h, self.core().reshape(self._core_shape))  # (..., k): (ReLU(S') - S) V^T x
        return self.ops.up(h, self.salt_U)  # (..., out)

    def _u_core(self) -> Tensor:
        return (self.ops.flat(self.salt_U) @ self.core()).reshape(self.salt_U.shape)  # (out, k...)

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return flat(self._u_core()).float() @ flat(self.salt_V).float()  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.salt_V, self._u_core().detach(), 1.0)

    def extra_losses(self) -> dict[str, Tensor]:
        """reg * (||a*sigma_top + c - sigma_top||_2 + ||X Y||_F) per layer (summed over layers); none when reg = 0."""
        reg = self.config.reg_multiplier
        if reg == 0:
            return {}
        s = self.salt_sigma[:self.t]
        spec = torch.linalg.vector_norm(self.salt_scale * s + self.salt_shift - s)
        return {"salt_reg": reg * (spec + torch.linalg.matrix_norm(self.salt_X @ self.salt_Y))}

    def disk_names(self) -> dict[str, str]:
        return {n: n for n in ("salt_scale", "salt_shift", "salt_X", "salt_Y", "salt_sigma")}
