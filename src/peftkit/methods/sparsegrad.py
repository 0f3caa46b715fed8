"""SparseGrad: train weights in a gradient-derived orthogonal basis, keeping only the top-k gradient entries per step.

Paper: Chekalina et al., "SparseGrad: A Selective Method for Efficient Fine-tuning of MLP Layers", arXiv 2410.07383
(code: sayankotor/sparse_grads, `llama_ft/sparse_grad_matrix_sparse_new.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import adapter_dtype

__all__ = ["SparseGradConfig", "SparseGradAdapter", "layer_type"]


@register_config
@dataclass(frozen=True, kw_only=True)
class SparseGradConfig(AdapterConfig):
    """SparseGrad settings (peft_type "SPARSEGRAD"; peft has no such method).

    keep_ratio: the fraction of each layer's transformed-gradient entries kept per step (paper: about 1%).
    keep_count: a fixed number of entries per layer instead (the paper's fixed-count variant); None = use keep_ratio.
    The paper adapts the MLP projections (up/down); pass those as target_modules.
    """

    peft_type: ClassVar[str] = "SPARSEGRAD"
    method_name: ClassVar[str] = "sparsegrad"

    keep_ratio: float = 0.01
    keep_count: int | None = None

    def validate(self) -> None:
        ratio = self.keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError("keep_ratio", f"must be in (0, 1], e.g. 0.01 keeps 1% of the gradient, got {ratio!r}")
        count = self.keep_count
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ConfigError("keep_count", f"must be None or an integer >= 1, got {count!r}")

    def kept(self, numel: int) -> int:
        """k for a layer with `numel` weight entries."""
        k = self.keep_count if self.keep_count is not None else math.ceil(self.keep_ratio * numel)
        return max(1, min(k, numel))


def layer_type(path: str) -> str:
    """The module path with layer indices replaced by '*': layers of one type share U and V."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path)


def _top_eigvecs(s: Tensor) -> Tensor:
    """Eigenvectors of a symmetric PSD matrix as columns, by decreasing eigenvalue. With S = sum_l G_l G_l^T these
    are the left singular vectors of the unfolding [G_1 ... G_L] (the HOSVD factor of that mode)."""
    _, vecs = torch.linalg.eigh(s)  # ascending
    return vecs.flip(-1)


@register_adapter("sparsegrad", SparseGradConfig)
class SparseGradAdapter(Adapter):
    """SparseGrad (arXiv 2410.07383): W = V W~ U with W~ = V^T W U^T, trained with top-k sparse gradients.

    U (in, in) and V (out, out): orthogonal, shared by the layers of one type (same path up to the layer index),
    from a HOSVD of their calibration gradients (core.calibrate "grad"). W~ = V^T W U^T + D~ with D~ (out, in)
    trainable and starting at 0 (the base keeps W, so no dense W~ copy is stored besides D~):
        y = W x + b + V D~ U x
    dL/dD~ = V^T (dL/dW) U^T is dL/dW~, the transformed gradient; before each optimizer step all but its k largest
    entries are zeroed (before_optimizer_step). Identity at init. Merge: W' = W + V D~ U, exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    calibration = frozenset({"grad"})

    def __init__(self, ops: LayerOps, config: SparseGradConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None and ctx.path else "layer"
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"{path}: sparsegrad adapts nn.Linear and transformers Conv1D only, not "
                                        f"{ops.kind} layers; narrow target_modules")
        out, inp, dtype, device = ops.out_features, ops.in_features, adapter_dtype(ops), ops.weight.device
        self.group = layer_type(path)
        shared = ctx.shared if ctx is not None else {}
        entry = shared.setdefault(f"sparsegrad:{self.group}", {
            "U": torch.eye(inp, dtype=dtype, device=device), "V": torch.eye(out, dtype=dtype, device=device),
            "members": 0, "sums": None})  # U (in, in), V (out, out): identity until calibrated
        if entry["U"].shape != (inp, inp) or entry["V"].shape != (out, out):
            raise UnsupportedLayerError(f"{path}: layers of type {self.group!r} must share one shape to share U, V; "
                                        f"this one is ({out}, {inp}); target them separately")
        entry["members"] += 1
        self._entry = entry
        self.register_buffer("sparsegrad_U", entry["U"])  # (in, in), shared
        self.register_buffer("sparsegrad_V", entry["V"])  # (out, out), shared
        self.sparsegrad_delta = self.new_param((out, inp), dtype, device)  # (out, in): D~, starts at 0
        self.k = config.kept(out * inp)

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        """Accumulate this layer's gradient into its type's HOSVD sums; the type's last layer sets U and V."""
        g = stats["grad"].double()  # (out, in)
        entry = self._entry
        if entry["sums"] is None:
            entry["sums"], entry["seen"] = [torch.zeros_like(g @ g.T), torch.zeros_like(g.T @ g)], 0
        entry["sums"][0] += g @ g.T  # (out, out)
        entry["sums"][1] += g.T @ g  # (in, in)
        entry["seen"] += 1
        if entry["seen"] == entry["members"]:
            with torch.no_grad():
                entry["V"].copy_(_top_eigvecs(entry["sums"][0]))  # (out, out)
                entry["U"].copy_(_top_eigvecs(entry["sums"][1]).T)  # (in, in)
            entry["sums"] = None

    def delta(self) -> Tensor:
        """V D~ U, (out, in) in the adapter dtype (differentiable in D~)."""
        return self.sparsegrad_V @ self.sparsegrad_delta @ self.sparsegrad_U  # (out, in)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        d = self.delta()
        return F.linear(self.cast_input(x, d), d)  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        d = self.delta()
        return self.ops.up_add_(y, self.cast_input(x, d), d)  # y += x (V D~ U)^T

    def delta_weight(self) -> Tensor:
        return self.sparsegrad_V.float() @ self.sparsegrad_delta.float() @ self.sparsegrad_U.float()  # (out, in)

    def lowered(self) -> LowRank:
        """Exact, of rank out: A = D~ U (out, in), B = V (out, out)."""
        a = (self.sparsegrad_delta @ self.sparsegrad_U).detach()  # (out, in)
        return LowRank(a, self.sparsegrad_V, 1.0)

    def disk_names(self) -> dict[str, str]:
        return {"sparsegrad_delta": "sparsegrad_delta"}

    def shared_disk_names(self) -> dict[str, str]:
        return {"sparsegrad_U": f"sparsegrad_U.{self.group}", "sparsegrad_V": f"sparsegrad_V.{self.group}"}

    @torch.no_grad()
    def before_optimizer_step(self, step: int) -> None:
        """Keep the k largest |dL/dW~| entries of this layer's gradient, zero the rest."""
        g = self.sparsegrad_delta.grad  # (out, in)
        if g is None or self.k >= g.numel():
            return
        flat = g.view(-1)
        keep = flat.abs().topk(self.k).indices  # (k,)
        kept = flat[keep].clone()
        flat.zero_()
        flat[keep] = kept
