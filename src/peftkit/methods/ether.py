"""ETHER / ETHER+: fine-tuning by block-diagonal hyperplane reflections of the frozen weight (arXiv 2405.20271)."""

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
from ..errors import ConfigError, UnsupportedLayerError
from .lora import adapter_dtype

__all__ = ["EtherConfig", "EtherAdapter", "EtherPlusAdapter"]

SUPPORTED_KINDS = ("linear", "conv1d_transposed")
MAX_BLOCKS = 65536


@register_config
@dataclass(frozen=True, kw_only=True)
class EtherConfig(AdapterConfig):
    """ETHER / ETHER+ settings (peft_type "ETHER"; peft has no such method).

    nb: number of diagonal blocks; it must divide every adapted layer's in_features (and out_features when
    two_sided). ether_plus: the relaxed transform H+ = I - uu^T/|u|^2 + vv^T/|v|^2 (method "ether_plus") instead
    of the reflection H = I - 2uu^T/|u|^2 (method "ether"). two_sided: also transform the output side,
    W' = H_left W H (the paper's "HH" variant). init_weights: True = u kaiming-uniform per block and v = -u
    (ETHER+ starts at the identity); False = v drawn independently too (a non-trivial ETHER+, for tests).
    """

    peft_type: ClassVar[str] = "ETHER"
    method_name: ClassVar[str] = "ether"

    nb: int = 4
    ether_plus: bool = False
    two_sided: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        if not isinstance(self.nb, int) or isinstance(self.nb, bool) or not 1 <= self.nb <= MAX_BLOCKS:
            raise ConfigError("nb", f"the number of blocks must be an integer in [1, {MAX_BLOCKS}], got {self.nb!r}")
        for name in ("ether_plus", "two_sided", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")

    @property
    def method(self) -> str:
        return "ether_plus" if self.ether_plus else "ether"


def minus_identity(t: Tensor, terms: list[tuple[Tensor, Tensor]]) -> Tensor:
    """(H - I) t per block for t (..., nb*d), with H - I = sum_k c_k w_k w_k^T in every block.

    terms: [(w (nb, d), c (nb,))]. Elementwise products and a sum over k, so that ETHER+ terms with v = -u cancel
    exactly (no fused multiply-add inside a GEMM leaves a rounding residue).
    """
    nb, d = terms[0][0].shape
    tb = t.reshape(*t.shape[:-1], nb, d)  # (..., nb, d)
    out = sum(((tb * w).sum(-1, keepdim=True) * c[:, None]) * w for w, c in terms)  # (..., nb, d)
    return out.reshape(t.shape)


def block_embed(w: Tensor) -> Tensor:
    """(nb, d) block vectors -> (nb, nb*d), row i holding w_i in block i (the columns of blockdiag's factors)."""
    nb, d = w.shape
    return (w[:, None, :] * torch.eye(nb, dtype=w.dtype, device=w.device)[:, :, None]).reshape(nb, nb * d)


@register_adapter("ether", EtherConfig)
class EtherAdapter(Adapter):
    """ETHER (arXiv 2405.20271): y = W' x + b, W' = W blockdiag(H_1..H_nb), H_i = I - 2 u_i u_i^T / |u_i|^2.

    Each H_i is a reflection (orthogonal, det -1), so |W' - W|_F <= 2 |W|_F. two_sided: W' = blockdiag(H~) W
    blockdiag(H). Contribution (W' - W) x = W (H - I) x (+ (H~ - I) W H x), with H applied to x block by block
    (never an in x in matrix). Not the identity at init: training starts from a reflected weight.
    Merge: D = W' - W from the base at merge time (delta_reads_base; the host keeps D, so unmerge subtracts it).
    Lowered: H - I = E diag(c) E^T with E the block-embedded vectors, so D = (W E)(diag(c) E^T), rank nb per
    vector set (plus the left side's), an exact LowRank.
    """

    capabilities = frozenset({"mergeable", "servable"})
    needs_base_output = True  # two_sided reads W x; both variants read W
    delta_reads_base = True

    def __init__(self, ops: LayerOps, config: EtherConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind not in SUPPORTED_KINDS:
            raise UnsupportedLayerError(f"ETHER supports Linear and Conv1D layers, not {ops.kind!r}")
        self.plus, self.two_sided = config.ether_plus, config.two_sided
        sides = {"": ops.in_features} | ({"_left": ops.out_features} if config.two_sided else {})
        for suffix, n in sides.items():
            if n % config.nb:
                where = ctx.path if ctx is not None and ctx.path else "layer"
                raise ConfigError("nb", f"{where}: nb={config.nb} must divide its {'out' if suffix else 'in'}_features"
                                        f"={n}; choose a common divisor of the adapted widths or exclude the module")
            names = ["ether_u" + suffix] + (["ether_v" + suffix] if self.plus else [])
            for name in names:
                setattr(self, name, self.new_param((config.nb, n // config.nb), adapter_dtype(ops), ops.weight.device))
            if initialize:
                self._initialize(suffix, config.init_weights)

    @torch.no_grad()
    def _initialize(self, suffix: str, v_is_minus_u: bool) -> None:
        """u: kaiming-uniform with fan_in d (U(-1/sqrt(d), 1/sqrt(d))), independently per block. v = -u (ETHER+)."""
        u = getattr(self, "ether_u" + suffix)  # (nb, d)
        nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        if self.plus:
            v = getattr(self, "ether_v" + suffix)  # (nb, d)
            if v_is_minus_u:
                v.copy_(-u)
            else:
                nn.init.kaiming_uniform_(v, a=math.sqrt(5))

    def terms(self, suffix: str = "") -> list[tuple[Tensor, Tensor]]:
        """[(w (nb, d), c (nb,))] with H - I = sum_k c_k w_k w_k^T per block (suffix "_left": the output side)."""
        u = getattr(self, "ether_u" + suffix)  # (nb, d)
        if not self.plus:
            return [(u, -2 / (u * u).sum(-1))]
        v = getattr(self, "ether_v" + suffix)  # (nb, d)
        return [(u, -1 / (u * u).sum(-1)), (v, 1 / (v * v).sum(-1))]

    def _weight(self) -> Tensor:
        return self.ops.weight2d().detach().to(self.ether_u.dtype)  # (out, in)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        x = self.cast_input(x, self.ether_u)
        y = F.linear(minus_identity(x, self.terms()), self._weight())  # (..., out): W (H - I) x
        if not self.two_sided:
            return y
        if z is None:
            raise ValueError("two-sided ETHER needs the base output z = W x")
        return y + minus_identity(z.to(y.dtype) + y, self.terms("_left"))  # + (H~ - I) W H x

    def delta_weight(self) -> Tensor:
        with torch.no_grad():
            w = self._weight()  # (out, in)
            d = minus_identity(w, self.terms())  # (out, in): W H - W (H symmetric: transform the rows)
            if self.two_sided:
                d = d + minus_identity((w + d).T, self.terms("_left")).T  # + (H~ - I) W H
            return d.float()

    def lowered(self) -> LowRank:
        with torch.no_grad():
            w = self._weight()  # (out, in)
            e = torch.cat([block_embed(v) for v, _ in self.terms()])  # (k nb, in)
            a = torch.cat([c for _, c in self.terms()])[:, None] * e  # (k nb, in): diag(c) E^T
            b = w @ e.T  # (out, k nb): W E
            if self.two_sided:
                el = torch.cat([block_embed(v) for v, _ in self.terms("_left")])  # (k nb, out)
                cl = torch.cat([c for _, c in self.terms("_left")])[:, None]  # (k nb, 1)
                a = torch.cat([a, cl * (el @ (w + b @ a))])  # (r, in): [.; diag(c~) E~^T W H]
                b = torch.cat([b, el.T], dim=1)  # (out, r): [W E, E~]
            return LowRank(a, b, 1.0)

    def disk_names(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters(recurse=False)}


@register_adapter("ether_plus", EtherConfig, config_defaults={"ether_plus": True})
class EtherPlusAdapter(EtherAdapter):
    """ETHER+ (arXiv 2405.20271): W' = W blockdiag(H+_i), H+_i = I - u_i u_i^T/|u_i|^2 + v_i v_i^T/|v_i|^2.

    H+ is not orthogonal (it may be singular, e.g. v perpendicular to u), but |H+ - I|_2 <= 1 per block, so
    |W' - W|_F <= |W|_F. v = -u at init gives H+ = I exactly: the output equals the base. two_sided adds the
    output-side H+~ (the paper's ETHER+ "HH"). Merge as ETHER: D is kept from merge time, never inverted.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
