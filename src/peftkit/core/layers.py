"""Layer views: each supported base layer type seen as a 2-D weight (out, in_flat) plus the two factor ops.

A method written against `LayerOps` works on Linear, transformers Conv1D, Embedding and Conv1d/2d/3d
without knowing which it got: `down(x, A)` applies an (r, in...) factor in the layer's geometry, `up(h, B)`
applies an (out, r...) factor, and `channel(v)` reshapes an (out,) vector to broadcast over the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError

__all__ = ["LayerOps", "ops_for", "is_linear_like"]


class LayerOps:
    """Base view; subclasses fix the geometry. Holds the base module by reference, never copies it."""

    kind = "linear"
    token_wise = True  # output row i depends on input row i only: (..., in) may be flattened to (N, in)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # --- geometry -------------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def out_features(self) -> int:
        return self.weight2d().shape[0]

    @property
    def in_features(self) -> int:
        return self.weight2d().shape[1]

    def weight2d(self) -> Tensor:
        """The base weight as (out, in_flat), a view where the layout allows."""
        return self.to_2d(self.weight)

    def to_2d(self, native: Tensor) -> Tensor:
        """A tensor in the weight's native layout (the weight, its gradient) as (out, in_flat)."""
        return native

    def to_native(self, w2d: Tensor) -> Tensor:
        """Inverse of weight2d for a tensor of the same (out, in_flat) shape."""
        return w2d

    def set_weight2d(self, w2d: Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(self.to_native(w2d).to(self.weight.dtype))

    def add_weight2d(self, delta2d: Tensor) -> None:
        """W += delta2d (out, in_flat), computed in fp32 and stored in the weight's dtype."""
        w = self.weight2d()
        self.set_weight2d(w.float() + delta2d.to(w.device, torch.float32))

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r)

    def channel_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def channel(self, v: Tensor) -> Tensor:
        """(out,) -> shape broadcasting over this layer's output."""
        return v.reshape(self.channel_shape())

    @staticmethod
    def flat(factor: Tensor) -> Tensor:
        """A factor in its stored shape (a_shape / b_shape) as a matrix: (r, in_flat) or (out, r)."""
        return factor.reshape(factor.shape[0], -1)

    # --- factor ops -----------------------------------------------------------------------------------------
    def down(self, x: Tensor, a: Tensor) -> Tensor:
        """Apply A, stored in a_shape, to the layer input."""
        return F.linear(x, a)  # (..., in) -> (..., r)

    def up(self, h: Tensor, b: Tensor) -> Tensor:
        return F.linear(h, b)  # (..., r) -> (..., out)

    def up_add_(self, y: Tensor, h: Tensor, b: Tensor) -> Tensor:
        """up_add, in place on a 2-D y (the running layer output the host hands over; see Adapter.add_to)."""
        if y.dim() == 2 and self.kind != "conv" and y.dtype == b.dtype:
            return y.addmm_(h, b.T)  # (N, out) += (N, r) @ (r, out)
        return self.up_add(y, h, b)

    def up_add(self, y: Tensor, h: Tensor, b: Tensor) -> Tensor:
        """y + up(h, B), fused into one GEMM (addmm, beta=1) where the layout allows."""
        if self.kind == "conv" or y.dtype != b.dtype:
            return y + self.up(h, b).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.T)  # (N, out)
        return out.view(y.shape)

    def without_bias(self, y: Tensor) -> Tensor:
        """A base output with the base bias taken off: z = W x."""
        return y if self.bias is None else y - self.channel(self.bias)

    def input_for(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The layer input cast for an adapter of `dtype` (index inputs stay integer)."""
        return x.to(dtype)


class Conv1DOps(LayerOps):
    """transformers `Conv1D`: weight stored (in, out), y = x @ W + b (peft's fan_in_fan_out)."""

    kind = "conv1d_transposed"

    def to_2d(self, native: Tensor) -> Tensor:
        return native.T

    def to_native(self, w2d: Tensor) -> Tensor:
        return w2d.T


class EmbeddingOps(LayerOps):
    """nn.Embedding as a linear map of the one-hot input: weight2d = W^T, (dim, num_embeddings)."""

    kind = "embedding"
    token_wise = False

    def to_2d(self, native: Tensor) -> Tensor:
        return native.T

    def to_native(self, w2d: Tensor) -> Tensor:
        return w2d.T

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        m = self.module
        return F.embedding(x, a.T, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)  # (..., r)

    def input_for(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x


class ConvOps(LayerOps):
    """nn.Conv1d/2d/3d: A is a conv with the base kernel/stride/padding, B a 1x1 conv; weight2d = (out, in*k)."""

    kind = "conv"
    token_wise = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[module.weight.dim() - 2]

    def to_2d(self, native: Tensor) -> Tensor:
        return native.flatten(1)

    def to_native(self, w2d: Tensor) -> Tensor:
        return w2d.reshape(self.weight.shape)

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, *self.weight.shape[1:])

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r, *([1] * (self.weight.dim() - 2)))

    def channel_shape(self) -> tuple[int, ...]:
        return (1, self.out_features, *([1] * (self.weight.dim() - 2)))

    def down(self, x: Tensor, a: Tensor) -> Tensor:
        m = self.module
        return self._conv(x, a, None, m.stride, m.padding, m.dilation)  # (N, in, ...) -> (N, r, ...)

    def up(self, h: Tensor, b: Tensor) -> Tensor:
        return self._conv(h, b)  # (N, r, ...) -> (N, out, ...)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers Conv1D (detected by name so core never imports transformers)."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def ops_for(module: nn.Module, path: str = "") -> LayerOps:
    """The LayerOps view of a module, or UnsupportedLayerError saying which types are supported."""
    if isinstance(module, nn.Linear):
        return LayerOps(module)
    if _is_hf_conv1d(module):
        return Conv1DOps(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingOps(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{path or type(module).__name__}: convolutions with groups={module.groups} or "
                f"padding_mode={module.padding_mode!r} are not supported; exclude this module")
        return ConvOps(module)
    raise UnsupportedLayerError(
        f"{path or 'module'} is a {type(module).__name__}; supported layer types are nn.Linear, "
        "transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d. Narrow target_modules or add it to exclude_modules")
