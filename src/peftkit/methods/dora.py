"""DoRA: weight-decomposed LoRA, a trainable per-output-channel magnitude over a LoRA-updated direction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext, LowRank
from ..core.layers import LayerOps
from ..core.registry import register_adapter
from ..errors import ConfigError
from .lora import LoraAdapter, LoraConfig

__all__ = ["DoraAdapter", "row_norm_reference"]


class _ScaledAddInPlace(torch.autograd.Function):
    """out = r * (z + h B^T) with r = m / n, written into z's storage; saves `out` instead of t = z + h B^T.

    h = s * x A^T is computed inside. With g = dL/dout and N tokens: dz = g r, dB = (g r)^T h,
    dh = s (g r) B, dA = dh^T x, dx = dh A, dm = sum_N(g * t) / n = sum_N(g * out) / m (needs m != 0).
    """

    @staticmethod
    def forward(ctx, z: Tensor, x: Tensor, a: Tensor, b: Tensor, m: Tensor, n: Tensor, s: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = (x2 @ a.T).mul_(s)  # (N, r)
        ratio = m / n  # (out,)
        z.view(-1, z.shape[-1]).addmm_(h, b.T).mul_(ratio)  # (N, out), in place
        ctx.mark_dirty(z)
        ctx.save_for_backward(x2, a, b, h, z, m, ratio)
        ctx.s, ctx.x_shape = s, x.shape
        return z

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, a, b, h, out, m, ratio = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gt = g2 * ratio  # (N, out)
        dm = (g2 * out.view_as(g2)).sum(0) / m  # (out,)
        dh = (gt @ b).mul_(ctx.s)  # (N, r)
        return gt.view(g.shape), (dh @ a).view(ctx.x_shape), dh.T @ x2, gt.T @ h, dm, None, None


def row_norm_reference(w2d: Tensor, a2d: Tensor, b2d: Tensor, s: float) -> Tensor:
    """Slow twin: ||W + s B A||_row with the full (out, in) product materialized."""
    return torch.linalg.vector_norm(w2d.float() + s * (b2d.float() @ a2d.float()), dim=1)  # (out,)


@register_adapter("dora", LoraConfig, config_defaults={"use_dora": True}, selects=lambda c: c.use_dora)
class DoraAdapter(LoraAdapter):
    """DoRA (arXiv 2402.09353): y = (m / n) * (W x + s B A drop(x)) + b, n = ||W + s B A||_row (detached).

    Computed as a contribution to the base output z = W x: (m/n - 1) * z + (m/n) * s B A drop(x).
    n never materializes B A: n^2 = ||w_i||^2 + 2 s <b_i, (W A^T)_i> + s^2 b_i^T (A A^T) b_i.
    Merge: W' = diag(m/n) (W + s B A) (row_scale); the host keeps m/n for an exact unmerge.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})  # lowered(): channel-scaled form
    needs_base_output = True

    @classmethod
    def check_config(cls, config: LoraConfig) -> None:
        if config.lora_bias:
            raise ConfigError("lora_bias", "cannot be combined with use_dora=True; set one of them to False")

    def __init__(self, ops: LayerOps, config: LoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        w = ops.weight2d().detach().float()
        norm = torch.linalg.vector_norm(w, dim=1)  # (out,); m/n = 1 at init
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(ops.channel_shape()).to(self.lora_A.dtype))
        self._sq_cache: tuple[tuple, Tensor] | None = None
        self._norm_cache: tuple[tuple, Tensor] | None = None

    @property
    def _norm_dtype(self) -> torch.dtype:
        """At least fp32 (fp64 adapters keep fp64)."""
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    def _weight_sq(self, w2d: Tensor) -> Tensor:
        """rowsum(W * W), cached until the base weight changes."""
        key = (w2d.data_ptr(), w2d._version)
        if self._sq_cache is None or self._sq_cache[0] != key:
            self._sq_cache = (key, w2d.to(self._norm_dtype).square().sum(dim=1))  # (out,)
        return self._sq_cache[1]

    def weight_norm(self) -> Tensor:
        """||W + s B A||_row (out,) in fp32, detached; cached until A, B or W change (decoding reuses it)."""
        w, a, b = self.ops.weight2d(), self.lora_A, self.lora_B
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), w.data_ptr(), w._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self._factored_norm())
        return self._norm_cache[1]

    @torch.no_grad()
    def _factored_norm(self) -> Tensor:
        """n without forming B A: n^2 = rowsum(W*W) + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)."""
        w = self.ops.weight2d()
        a = self.ops.flat(self.lora_A).to(self._norm_dtype)  # (r, in)
        b = self.ops.flat(self.lora_B).to(self._norm_dtype)  # (out, r)
        s = self.scaling
        m = w.to(a.dtype) @ a.T  # (out, r) = W A^T
        g = a @ a.T  # (r, r)
        sq = self._weight_sq(w) + 2 * s * (b * m).sum(dim=1) + s * s * ((b @ g) * b).sum(dim=1)  # (out,)
        return sq.clamp_min(0).sqrt()

    def ratio(self) -> Tensor:
        """m / n broadcast over the layer output."""
        return self.lora_magnitude_vector / self.ops.channel(self.weight_norm()).to(self.lora_A.dtype)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        """(m/n - 1) z' + (m/n) s B A x' = (m/n) t - z' with t = z' + s B A x' (one GEMM).

        x' = drop(x) and z' = W x', the base output of the dropped-out input (as the DoRA reference code and
        peft do); without active dropout x' = x and z' = z, so no extra base matmul is spent.
        """
        xd = self.dropout(x)
        zd = z if xd is x else self.ops.without_bias(self.ops.module(xd))
        t = self.ops.up_add(zd.to(self.lora_A.dtype), self.project(xd), self.lora_B)  # (..., out)
        return torch.addcmul(-zd.to(t.dtype), t, self.ratio())

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        """When y is z (first contribution, bias-free base) the whole update is (m/n) t, done in place in z."""
        if self._can_fuse(y, x, z):
            return _ScaledAddInPlace.apply(z, x, self.lora_A, self.lora_B, self.lora_magnitude_vector,
                                           self.weight_norm(), self.scaling)
        return y + self.forward(x, z).to(y.dtype)  # not LoraAdapter.add_to, which adds the plain LoRA term

    def _can_fuse(self, y: Tensor, x: Tensor, z: Tensor) -> bool:
        """The in-place path: a 2-D layer, y is z (the host hands over z only when nothing else reads it), no
        active dropout, one dtype, and no zero magnitude (dm divides by m)."""
        dropout_off = isinstance(self.dropout, nn.Identity) or not self.training
        return (y is z and dropout_off and self.ops.kind in ("linear", "conv1d_transposed") and z.dtype == x.dtype
                == self.lora_A.dtype and bool((self.lora_magnitude_vector != 0).all()))

    def row_scale(self, w2d: Tensor) -> Tensor:
        """m / ||W + s B A||_row: merging gives W' = diag(m/n) (W + s B A), exact."""
        v = w2d + self.delta_weight()  # (out, in_flat)
        return self.lora_magnitude_vector.detach().float().reshape(-1) / torch.linalg.vector_norm(v, dim=1)

    def lowered(self) -> LowRank:
        """out_scale = m / ||W + s B A||_row: the contribution is out_scale * (z + s B A x) - z."""
        ratio = self.ratio().detach().reshape(-1)  # (out,)
        return LowRank(self.lora_A.detach(), self.lora_B.detach(), self.scaling, out_scale=ratio)

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"lora_magnitude_vector": "lora_magnitude_vector"}
