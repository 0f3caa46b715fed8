"""SVFit: train only the top-r singular values of W; the principal singular subspaces stay fixed.

Paper: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
arXiv 2409.05926 (no official code located).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .common import adapter_dtype, check_rank

__all__ = ["SvfitConfig", "SvfitAdapter", "energy_rank"]


def energy_rank(w2d: Tensor, threshold: float = 0.99) -> int:
    """The smallest r whose top-r singular values hold `threshold` of W's energy sum(sigma^2) (the paper's ">99%
    of the information" reading); use it to choose `r` per layer."""
    if not 0 < threshold <= 1:
        raise ConfigError("threshold", f"must be in (0, 1], got {threshold!r}")
    s = torch.linalg.svdvals(w2d.detach().float())  # (k,)
    energy = (s.square().cumsum(0) / s.square().sum().clamp_min(1e-30)).cpu()  # (k,), increasing to 1
    return min(int(torch.searchsorted(energy, torch.tensor(threshold - 1e-7))) + 1, s.numel())


@register_config
@dataclass(frozen=True, kw_only=True)
class SvfitConfig(AdapterConfig):
    """r: the number of top singular values that train (>= 1; a layer with k = min(out, in) < r trains all k)."""

    peft_type: ClassVar[str] = "SVFIT"
    method_name: ClassVar[str] = "svfit"

    r: int = 16

    def validate(self) -> None:
        check_rank("r", self.r)


@register_adapter("svfit", SvfitConfig)
class SvfitAdapter(Adapter):
    """SVFit (arXiv 2409.05926): W' = W_e + U_r diag(sigma) V_r^T with W_e = W - U_r diag(sigma_0) V_r^T.

    Computed as the contribution U_r diag(sigma - sigma_0) V_r^T x added to the untouched base output, so the
    output equals the base at init (sigma = sigma_0) and deleting the adapter leaves W as it was. U_r (out, r),
    V_r^T (r, in...) and sigma_0 (r,) are frozen persistent buffers (saved: loading needs no SVD); only sigma (r,)
    trains. Merge: W' = W + U_r diag(sigma - sigma_0) V_r^T, exact; unmerge restores W (sigma_0 is kept).
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    # sigma starts at ||W||-sized values, LoRA factors near 0: Adam moves each by ~lr per step, so sigma's relative
    # step would be orders smaller; 10x brings it near LoRA's (the paper gives no learning rate).
    lr_scale = {"svfit_sigma": 10.0}

    def __init__(self, ops: LayerOps, config: SvfitConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device = adapter_dtype(ops), ops.weight.device
        r = min(config.r, ops.out_features, ops.in_features)
        self.register_buffer("svfit_U", torch.zeros(ops.b_shape(r), dtype=dtype, device=device))  # (out, r...)
        self.register_buffer("svfit_V", torch.zeros(ops.a_shape(r), dtype=dtype, device=device))  # (r, in...)
        self.register_buffer("svfit_sigma0", torch.zeros(r, dtype=dtype, device=device))  # (r,)
        self.svfit_sigma = self.new_param((r,), dtype, device)  # (r,)
        if initialize:
            self._initialize(r)

    @torch.no_grad()
    def _initialize(self, r: int) -> None:
        u, s, vh = torch.linalg.svd(self.ops.weight2d().detach().float(), full_matrices=False)  # (out,k) (k,) (k,in)
        self.svfit_U.copy_(u[:, :r].reshape(self.svfit_U.shape))  # (out, r...)
        self.svfit_V.copy_(vh[:r].reshape(self.svfit_V.shape))  # (r, in...)
        self.svfit_sigma0.copy_(s[:r])  # (r,)
        self.svfit_sigma.copy_(s[:r])  # (r,): the original values

    def _rank_vector(self, v: Tensor, like: Tensor) -> Tensor:
        """(r,) shaped to broadcast over the rank axis of down(x, V) (axis 1 for convolutions, else the last)."""
        return v.reshape(-1, *[1] * (like.dim() - 2)) if self.ops.kind == "conv" else v

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(x, self.svfit_V), self.svfit_V)  # (..., r): V_r^T x
        h = h * self._rank_vector(self.svfit_sigma - self.svfit_sigma0, h)  # (..., r)
        return self.ops.up(h, self.svfit_U)  # (..., out)

    def delta_weight(self) -> Tensor:
        flat, d = self.ops.flat, (self.svfit_sigma - self.svfit_sigma0).float()  # d: (r,)
        return (flat(self.svfit_U).float() * d) @ flat(self.svfit_V).float()  # (out, in_flat)

    def lowered(self) -> LowRank:
        d = (self.svfit_sigma - self.svfit_sigma0).detach()  # (r,)
        a = self.svfit_V * d.reshape(-1, *[1] * (self.svfit_V.dim() - 1))  # (r, in...)
        return LowRank(a, self.svfit_U, 1.0)

    def disk_names(self) -> dict[str, str]:
        return {n: n for n in ("svfit_sigma", "svfit_U", "svfit_V", "svfit_sigma0")}

