"""DoRA: weight-decomposed LoRA, a trainable per-output-channel magnitude over a LoRA-updated direction."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.layers import LayerOps
from ..core.registry import register_adapter
from .lora import LoraAdapter, LoraConfig

__all__ = ["DoraAdapter", "row_norm_reference"]


def row_norm_reference(w2d: Tensor, a2d: Tensor, b2d: Tensor, s: float) -> Tensor:
    """Slow twin: ||W + s B A||_row with the full (out, in) product materialized."""
    return torch.linalg.vector_norm(w2d.float() + s * (b2d.float() @ a2d.float()), dim=1)  # (out,)


@register_adapter("dora", LoraConfig)
class DoraAdapter(LoraAdapter):
    """DoRA (arXiv 2402.09353): y = (m / n) * (W x + s B A drop(x)) + b, n = ||W + s B A||_row (detached).

    Computed as a contribution to the base output z = W x: (m/n - 1) * z + (m/n) * s B A drop(x).
    n never materializes B A: n^2 = ||w_i||^2 + 2 s <b_i, (W A^T)_i> + s^2 b_i^T (A A^T) b_i.
    Merge: W' = diag(m/n) (W + s B A) (row_scale); the host keeps m/n for an exact unmerge.
    """

    needs_base_output = True

    def __init__(self, ops: LayerOps, config: LoraConfig, initialize: bool = True) -> None:
        super().__init__(ops, config, initialize)
        w = ops.weight2d().detach().float()
        norm = torch.linalg.vector_norm(w, dim=1)  # (out,); m/n = 1 at init
        self.lora_magnitude_vector = nn.Parameter(norm.reshape(ops.channel_shape()).to(self.lora_A.dtype))
        self._sq_cache: tuple[tuple, Tensor] | None = None

    def _weight_sq(self, w2d: Tensor) -> Tensor:
        """rowsum(W * W), cached until the base weight changes."""
        key = (w2d.data_ptr(), w2d._version)
        if self._sq_cache is None or self._sq_cache[0] != key:
            self._sq_cache = (key, w2d.float().square().sum(dim=1))  # (out,)
        return self._sq_cache[1]

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """||W + s B A||_row (out,) in fp32 without forming B A; detached by construction."""
        w = self.ops.weight2d()
        a = self.ops.flat(self.lora_A).float()  # (r, in)
        b = self.ops.flat(self.lora_B).float()  # (out, r)
        s = self.scaling
        m = w.to(a.dtype) @ a.T  # (out, r) = W A^T
        g = a @ a.T  # (r, r)
        sq = self._weight_sq(w) + 2 * s * (b * m).sum(dim=1) + s * s * ((b @ g) * b).sum(dim=1)  # (out,)
        return sq.clamp_min(0).sqrt()

    def ratio(self) -> Tensor:
        """m / n broadcast over the layer output."""
        return self.lora_magnitude_vector / self.ops.channel(self.weight_norm()).to(self.lora_A.dtype)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.add_to(z, x, z) - z

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        """y + (m/n - 1) z' + (m/n) s B A x'  =  (y - z') + (m/n) (z' + s B A x'), the inner sum as one GEMM.

        x' = drop(x) and z' = W x' (the base output of the dropped-out input, as the DoRA reference code and
        peft do); without active dropout x' = x and z' = z, so no extra base matmul is spent.
        """
        xd = self.dropout(x)
        zd = z if xd is x else self._base_output(xd)
        t = self.ops.up_add(zd.to(self.lora_A.dtype), self.project(xd), self.lora_B)  # (..., out): z' + s B A x'
        ratio = self.ratio()
        out = t * ratio if y is zd else torch.addcmul((y - zd).to(t.dtype), t, ratio)
        return out.to(y.dtype)

    def _base_output(self, x: Tensor) -> Tensor:
        """W x without the bias, for a dropped-out input."""
        y = self.ops.module(x)
        return y if self.ops.bias is None else y - self.ops.channel(self.ops.bias)

    def row_scale(self, w2d: Tensor) -> Tensor:
        """m / ||W + s B A||_row: merging gives W' = diag(m/n) (W + s B A), exact."""
        v = w2d + self.delta_weight()  # (out, in_flat)
        return self.lora_magnitude_vector.detach().float().reshape(-1) / torch.linalg.vector_norm(v, dim=1)

    def lowered(self) -> None:
        return None

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"lora_magnitude_vector": "lora_magnitude_vector"}
