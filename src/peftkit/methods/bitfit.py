"""BitFit: train only bias terms, as a zero-initialized bias delta per adapted layer (BEFT-style on bias-free
layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .lora import adapter_dtype

__all__ = ["BitFitConfig", "BitFitAdapter"]

_REFS = "_peftkit_bitfit_merged"  # attribute on a bias BitFit created while merging: how many deltas it holds


@register_config
@dataclass(frozen=True, kw_only=True)
class BitFitConfig(AdapterConfig):
    """BitFit settings (peft_type "BITFIT"; peft has no tuner, its nearest is LoRA with bias="all").

    target_modules: the layers whose bias trains ("all-linear" = every Linear/Conv1D bias but the output head;
    the paper's subset: the query projections and the first FFN layer). Bias-free layers (Llama) get a bias that
    starts at zero (BEFT). init_weights: True = zero deltas (identity); False = N(0, 0.02) (tests).
    bias: must stay "none" (the deltas are the trained biases; "all" would train the base biases a second time).
    """

    peft_type: ClassVar[str] = "BITFIT"
    method_name: ClassVar[str] = "bitfit"

    init_weights: bool = True

    def validate(self) -> None:
        if self.bias != "none":
            raise ConfigError("bias", f"BitFit trains its own bias deltas; set bias='none', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError("init_weights", f"must be True or False, got {self.init_weights!r}")


@register_adapter("bitfit", BitFitConfig)
class BitFitAdapter(Adapter):
    """BitFit (arXiv 2106.10199): y = W x + (b + delta), delta (out,) trainable and zero at init.

    The base bias stays frozen; the adapter holds delta, so several BitFit adapters can coexist and the saved
    adapter is only the deltas (`<path>.bitfit_bias`). On a bias-free layer b = 0 (BEFT-style added bias).
    Merge: W unchanged (D = 0), b' = b + delta. On a bias-free nn.Linear/nn.Conv the merge adds a bias parameter
    to the base layer and unmerge removes it again (see `merged_bias`).
    Lowered: a LowRank with zero factors (rank 0; rank 1 on convolutions) and bias = delta (exact).
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    # BitFit's tuned rates (up to 1e-3 on GLUE) are about twice LoRA's on the same tasks (4e-4 to 5e-4)
    lr_scale: ClassVar[dict[str, float]] = {"bitfit_bias": 2.0}

    def __init__(self, ops: LayerOps, config: BitFitConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind == "embedding":
            raise UnsupportedLayerError("BitFit adapts layers with a bias (Linear, Conv1D, convolutions); an "
                                        "embedding has none and no place to merge one: leave it out of target_modules")
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.bitfit_bias = nn.Parameter(torch.zeros(ops.out_features, dtype=dtype, device=device))  # (out,)
        if initialize and not config.init_weights:
            with torch.no_grad():
                self.bitfit_bias.normal_(0.0, 0.02)
        r = 1 if ops.kind == "conv" else 0  # zero factors of rank 0 (a convolution needs >= 1 output channel)
        self.register_buffer("_a0", torch.zeros(ops.a_shape(r), dtype=dtype, device=device), persistent=False)
        self.register_buffer("_b0", torch.zeros(ops.b_shape(r), dtype=dtype, device=device), persistent=False)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        empty = self.ops.up(self.ops.down(self.cast_input(x, self._a0), self._a0), self._b0)  # (..., out) zeros
        return empty + self.ops.channel(self.bitfit_bias)  # the output's shape, for routed index_add

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return y + self.ops.channel(self.bitfit_bias).to(y.dtype)

    def delta_weight(self) -> Tensor:
        d = torch.zeros(self.ops.weight2d().shape, device=self.bitfit_bias.device)  # (out, in_flat)
        # the host's safe-merge check reads the merged weight only: report a non-finite delta through D
        return d if torch.isfinite(self.bitfit_bias).all() else d.fill_(float("nan"))

    def merged_bias(self, bias: Tensor | None, sign: int) -> Tensor | None:
        """b' = b + sign * delta. A bias-free base layer gets a frozen bias parameter on the first merge, removed
        when the last merged delta leaves, so unmerge restores the original module structure exactly. That bias is
        updated here in place (return None), because the host read the layer's bias (None) before the call."""
        delta = sign * self.bitfit_bias.detach()  # (out,)
        own = self.ops.bias
        if own is not None and not hasattr(own, _REFS):
            return own + delta.to(own.dtype)
        module, w = self.ops.module, self.ops.weight
        if own is None:
            module.bias = own = nn.Parameter(torch.zeros(self.ops.out_features, dtype=w.dtype, device=w.device),
                                             requires_grad=False)
            setattr(own, _REFS, 0)
        with torch.no_grad():
            own.add_(delta.to(own.dtype))
        setattr(own, _REFS, getattr(own, _REFS) + sign)
        if getattr(own, _REFS) <= 0:
            module.bias = None
        return None

    def lowered(self) -> LowRank:
        return LowRank(self._a0, self._b0, 1.0, bias=self.bitfit_bias.detach())

    def disk_names(self) -> dict[str, str]:
        return {"bitfit_bias": "bitfit_bias"}
