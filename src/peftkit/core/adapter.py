"""The method interface: one adapter's math on one base layer."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import MergeError
from .config import AdapterConfig
from .layers import LayerOps

__all__ = ["Adapter", "LowRank"]


class LowRank:
    """Canonical servable form of an adapter's delta: y += scale * up(down(x, A), B), optionally channel-scaled.

    A: (r, in...) in the layer's a_shape, B: (out, r...) in b_shape, scale: float.
    """

    def __init__(self, a: Tensor, b: Tensor, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale


class Adapter(nn.Module, metaclass=ABCMeta):
    """One adapter on one layer. Subclasses declare tensors in __init__ and implement `forward`.

    Contract:
      forward(x, z) returns the contribution added to the base output, where x is the layer input
        and z the base output without bias (only computed when `needs_base_output`).
      delta_weight() -> D, (out, in_flat) fp32, and row_scale(W) -> a (out,) or None: merging alone gives
        W' = a * (W + D) (a = 1 when None). Requires capability "mergeable". Adapters with a row scale
        must set needs_base_output (their contribution depends on W).
      disk_names(): parameter name -> PEFT key suffix; checkpoint/ adds the module prefix.
      init_delta: set by base-mutating inits; inject subtracts it from the base, delete adds it back.
    """

    method_name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    needs_base_output: ClassVar[bool] = False

    def __init__(self, ops: LayerOps, config: AdapterConfig, initialize: bool = True) -> None:
        super().__init__()
        self.ops = ops
        self.config = config
        self.init_delta: Tensor | None = None

    @abstractmethod
    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        """The contribution added to the base output for layer input x (z: base output without bias)."""

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        """y + forward(x, z); override to fuse the addition. y is the running layer output and may be updated in
        place; when `y is z` no other adapter reads z afterwards (see AdaptedLayer.forward)."""
        return y + self.forward(x, z).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """D in W' = a * (W + D); only adapters with the "mergeable" capability provide it."""
        raise MergeError(f"{type(self).__name__} cannot be merged (no 'mergeable' capability)")

    def row_scale(self, w2d: Tensor) -> Tensor | None:
        """Per-output-row factor a (out,) of the merge W' = a * (W + D), given the base weight; None = 1."""
        return None

    def merged_bias(self, bias: Tensor | None, sign: int) -> Tensor | None:
        """The base bias after merging (sign=+1) or unmerging (sign=-1); None = bias untouched."""
        return None

    def lowered(self) -> LowRank | None:
        """The canonical low-rank form if the adapter has one (enables cat/linear combination and serving)."""
        return None

    def disk_names(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters(recurse=False)}

    def state_for_original_base(self) -> dict[str, Tensor] | None:
        """Tensors (by parameter name) that apply to the base weight as it was before this adapter's init
        changed it; None when the init left the base alone."""
        return None

    def extra_losses(self) -> dict[str, Tensor]:
        """Named regularizers added to the training loss (empty for most methods)."""
        return {}

    def on_step(self, step: int) -> None:
        """Called after each optimizer step (rank schedules, mask updates); most methods do nothing."""

    def cast_input(self, x: Tensor, like: Tensor) -> Tensor:
        return self.ops.input_for(x, like.dtype)

    @staticmethod
    def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
