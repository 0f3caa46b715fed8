"""SVFT: singular-vector fine-tuning, a sparse trainable mix M of W's singular-vector outer products u_i v_j^T.

Paper: Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", arXiv 2405.19597
(reference code VijayLingam95/SVFT, `svft/svft_layers.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import CheckpointError, ConfigError
from .common import adapter_dtype, check_rank

__all__ = ["SvftConfig", "SvftAdapter", "PATTERNS", "canonical_svd", "pattern_size", "svft_pattern"]

PATTERNS = ("plain", "banded", "random", "top_k")
M_INITS = ("zero", "kaiming")


def canonical_svd(w2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD of w2d (out, in) in fp32, signs fixed so each u_i has its largest-|.| entry positive (v_i
    follows): U (out, k), S (k,), Vh (k, in). The same weight gives the same factors on every call."""
    u, s, vh = torch.linalg.svd(w2d.detach().float(), full_matrices=False)  # (out, k), (k,), (k, in)
    pick = u.abs().argmax(dim=0, keepdim=True)  # (1, k)
    sign = torch.where(u.gather(0, pick) < 0, -1.0, 1.0)  # (1, k)
    return u * sign, s, vh * sign.T


def check_sigma(saved: Tensor, now: Tensor, what: str) -> None:
    """Loading recomputes singular vectors from the base: refuse a base whose spectrum differs from the saved one."""
    if not torch.allclose(now.to(saved), saved, rtol=1e-4, atol=1e-4 * float(saved.abs().max().clamp_min(1e-12))):
        raise CheckpointError(f"{what}: the base weight's singular values differ from those saved with the "
                              "adapter; load it onto the same (original, unmerged) base model it was trained on")


def pattern_size(n: int, d: int) -> int:
    """|Omega| = n (2d + 1) - d (d + 1): the entries with |i - j| <= d of an n x n matrix (d < n)."""
    return n * (2 * d + 1) - d * (d + 1)


def svft_pattern(pattern: str, n: int, d: int, u: Tensor | None = None, vh: Tensor | None = None) -> Tensor:
    """The (2, |Omega|) int64 (row, col) indices of M's trainable entries; d is clamped to n - 1."""
    d = 0 if pattern == "plain" else min(d, n - 1)
    size = pattern_size(n, d)
    if pattern in ("plain", "banded"):
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")  # (n, n)
        keep = (i - j).abs() <= d
        return torch.stack([i[keep], j[keep]])  # row-major order
    if pattern == "random":
        flat = torch.randperm(n * n)[:size]  # distinct entries, uniformly at random
    else:  # top_k, the reference rule: the largest entries of U Vh^T (square W) or of the square factor
        coeffs = u @ vh.T if u.shape[0] == vh.shape[1] else (u if u.shape[0] == u.shape[1] else vh)
        flat = torch.topk(coeffs[:n, :n].reshape(-1), size).indices
    return torch.stack([flat // n, flat % n])


@register_config
@dataclass(frozen=True, kw_only=True)
class SvftConfig(AdapterConfig):
    """Field names follow the reference code (`rank`, `pattern`, `off_diag`).

    rank: n, the number of top singular directions used (None = all k = min(out, in); larger values clamp to k).
    pattern: "plain" (diagonal), "banded" (|i - j| <= off_diag), "random" (as many random distinct entries),
    "top_k" (as many entries, picked by the reference's alignment rule). off_diag: d >= 0 (clamped to n - 1).
    init_m: "zero" (M = 0: output equals the base at init) or "kaiming" (the reference: N(0, 2 / |Omega|)).
    """

    peft_type: ClassVar[str] = "SVFT"
    method_name: ClassVar[str] = "svft"

    rank: int | None = None
    pattern: str = "banded"
    off_diag: int = 2
    init_m: str = "zero"

    def validate(self) -> None:
        if self.rank is not None:
            check_rank("rank", self.rank)
        if self.pattern not in PATTERNS:
            raise ConfigError("pattern", f"must be one of {PATTERNS}, got {self.pattern!r}")
        d = self.off_diag
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError("off_diag", f"must be an integer >= 0 (0 = diagonal only), got {d!r}")
        if self.init_m not in M_INITS:
            raise ConfigError("init_m", f"must be one of {M_INITS}, got {self.init_m!r}")


@register_adapter("svft", SvftConfig)
class SvftAdapter(Adapter):
    """SVFT (arXiv 2405.19597): W' = W + sigmoid(g) U_n M V_n^T, i.e. y = W x + b + sigmoid(g) U_n M V_n^T x.

    U_n (out, n), V_n^T (n, in...): top-n singular vectors of W (sign-canonical SVD, recomputed from the base at
    load time, not saved). M (n, n) is sparse: its |Omega| trainable values `svft_m` sit at the saved indices
    `svft_index` (2, |Omega|). g: scalar gate `svft_gate`, init 0. With n = k this is the paper's
    U (S + sigmoid(g) M) V^T; with n < k the tail of W is kept (the reference drops it). Merge: exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})  # identity: init_m="zero" (default)

    def __init__(self, ops: LayerOps, config: SvftConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        dtype, device = adapter_dtype(ops), ops.weight.device
        k = min(ops.out_features, ops.in_features)
        n = k if config.rank is None else min(config.rank, k)
        size = pattern_size(n, 0 if config.pattern == "plain" else min(config.off_diag, n - 1))
        self.n = n
        self.register_buffer("svft_U", torch.zeros(ops.b_shape(n), dtype=dtype, device=device), persistent=False)
        self.register_buffer("svft_V", torch.zeros(ops.a_shape(n), dtype=dtype, device=device), persistent=False)
        self.register_buffer("svft_sigma", torch.zeros(n, dtype=dtype, device=device))  # (n,) base check
        self.register_buffer("svft_index", torch.zeros(2, size, dtype=torch.long, device=device))  # (2, |Omega|)
        self.svft_m = self.new_param((size,), dtype, device)  # (|Omega|,)
        self.svft_gate = self.new_param((1,), dtype, device)  # (1,), sigmoid(0) = 0.5
        self._dim = 1 if ops.kind == "conv" else -1  # the rank axis of down(x, V)
        if initialize:
            u, s, vh = self._factorize()
            with torch.no_grad():
                self.svft_sigma.copy_(s[:n])  # (n,)
                self.svft_index.copy_(svft_pattern(config.pattern, n, config.off_diag, u, vh))
                if config.init_m == "kaiming":
                    self.svft_m.normal_(0.0, math.sqrt(2.0 / size))  # kaiming-normal with fan_in = |Omega|

    @torch.no_grad()
    def _factorize(self) -> tuple[Tensor, Tensor, Tensor]:
        """Fill U_n and V_n^T from the current base weight; returns its full U (out, k), S (k,), Vh (k, in)."""
        u, s, vh = canonical_svd(self.ops.weight2d())
        self.svft_U.copy_(u[:, :self.n].reshape(self.svft_U.shape))  # (out, n...)
        self.svft_V.copy_(vh[:self.n].reshape(self.svft_V.shape))  # (n, in...)
        return u, s, vh

    def after_load(self) -> None:
        """The factors are not saved: recompute them from the base, after checking it is the saved one."""
        _, s, _ = self._factorize()
        check_sigma(self.svft_sigma, s[:self.n], "SVFT")

    def dense_m(self) -> Tensor:
        """sigmoid(g) M as a dense (n, n) matrix."""
        m = torch.zeros(self.n, self.n, dtype=self.svft_m.dtype, device=self.svft_m.device)
        m = m.index_put((self.svft_index[0], self.svft_index[1]), self.svft_m, accumulate=True)  # (n, n)
        return torch.sigmoid(self.svft_gate) * m

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        h = self.ops.down(self.cast_input(x, self.svft_V), self.svft_V)  # (..., n): V_n^T x
        rows, cols, dim = self.svft_index[0], self.svft_index[1], self._dim
        shape = [-1] + [1] * (h.dim() - 2) if dim == 1 else [-1]  # |Omega| along the rank axis
        src = h.index_select(dim, cols) * self.svft_m.reshape(shape)  # (..., |Omega|)
        mh = torch.zeros_like(h).index_add(dim, rows, src) * torch.sigmoid(self.svft_gate)  # (..., n): M V^T x
        return self.ops.up(mh, self.svft_U)  # (..., out)

    def _um(self) -> Tensor:
        return (self.ops.flat(self.svft_U) @ self.dense_m()).reshape(self.svft_U.shape)  # (out, n...)

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return flat(self._um()).float() @ flat(self.svft_V).float()  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.svft_V, self._um().detach(), 1.0)

    def disk_names(self) -> dict[str, str]:
        return {n: n for n in ("svft_m", "svft_gate", "svft_index", "svft_sigma")}
