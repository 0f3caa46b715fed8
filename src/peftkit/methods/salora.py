"""SaLoRA: safety-alignment-preserving LoRA, the update projected off a fixed, data-derived safety subspace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import MAX_RANK
from .inits import parse_init
from .lora import LoraAdapter, LoraConfig

__all__ = ["SaLoraConfig", "SaLoraAdapter", "safety_basis"]

SUPPORTED_KINDS = ("linear", "conv1d_transposed")
SUPPORTED_INITS = ("True", "False", "gaussian")


@register_config
@dataclass(frozen=True, kw_only=True)
class SaLoraConfig(LoraConfig):
    """SaLoRA settings: LoRA's fields plus salora_safety_rank r_s, the number of safety directions U_s per layer
    (1 <= r_s <= the layer's out_features). use_dora, lora_bias and base-mutating inits are refused.
    Adding the adapter needs calibration data (harmful prompts): add_adapter(..., calibration=Calibration(...)).
    """

    peft_type: ClassVar[str] = "SALORA"
    method_name: ClassVar[str] = "salora"

    salora_safety_rank: int = 8

    def validate(self) -> None:
        super().validate()
        r_s = self.salora_safety_rank
        if not isinstance(r_s, int) or isinstance(r_s, bool) or not 1 <= r_s <= MAX_RANK:
            raise ConfigError("salora_safety_rank", f"must be an integer in [1, {MAX_RANK}] (and at most each "
                                                    f"layer's out_features), got {r_s!r}")
        if self.use_dora:
            raise ConfigError("use_dora", "SaLoRA projects a plain LoRA update; set use_dora=False")
        if self.lora_bias:
            raise ConfigError("lora_bias", "SaLoRA does not project a bias on B; set lora_bias=False")
        if parse_init(self.init_lora_weights)[0] not in SUPPORTED_INITS:
            raise ConfigError("init_lora_weights", f"{self.init_lora_weights!r} changes the base weight and is not "
                                                   "identity under the safety projection; use True, False or "
                                                   "'gaussian'")

    def for_original_base(self) -> SaLoraConfig:
        return self  # SaLoRA never changes the base weight


def safety_basis(output_cov: Tensor, r_s: int) -> Tensor:
    """U_s (out, r_s): the eigenvectors of the top r_s eigenvalues of the output second moment (out, out),
    largest first (fp64 eigh)."""
    _, vecs = torch.linalg.eigh(output_cov.double())  # ascending eigenvalues, (out, out)
    return vecs[:, -r_s:].flip(-1)  # (out, r_s)


@register_adapter("salora", SaLoraConfig)
class SaLoraAdapter(LoraAdapter):
    """SaLoRA (arXiv 2501.01765): y = W x + b + s (I - U_s U_s^T) B A drop(x).

    U_s (out, r_s), fixed: the top-r_s eigenvectors of Y^T Y / N, the layer's base outputs (bias excluded) on the
    calibration batches (harmful prompts). Computed as B' = B - U_s (U_s^T B) (out, r): never out x out.
    Merge: W' = W + s (I - U_s U_s^T) B A, exact (U_s is frozen). The update satisfies U_s^T dW = 0.
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})
    calibration = frozenset({"output_cov"})

    def __init__(self, ops: LayerOps, config: SaLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind not in SUPPORTED_KINDS:
            raise UnsupportedLayerError(f"SaLoRA supports Linear and Conv1D layers, not {ops.kind}")
        if config.salora_safety_rank > ops.out_features:
            raise ConfigError("salora_safety_rank", f"{config.salora_safety_rank} exceeds this layer's "
                                                    f"out_features={ops.out_features}; lower it")
        super().__init__(ops, config, initialize, ctx)
        basis = torch.zeros(ops.out_features, config.salora_safety_rank, dtype=self.lora_A.dtype,
                            device=self.lora_A.device)  # (out, r_s); set by calibrate() or loaded
        self.register_buffer("salora_safety_basis", basis, persistent=True)

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        u = safety_basis(stats["output_cov"], self.config.salora_safety_rank)  # (out, r_s)
        with torch.no_grad():
            self.salora_safety_basis.copy_(u.to(self.salora_safety_basis))

    def projected_b(self) -> Tensor:
        """B' = (I - U_s U_s^T) B (out, r), differentiable in B."""
        u = self.salora_safety_basis  # (out, r_s)
        return self.lora_B - u @ (u.T @ self.lora_B)  # (out, r)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self.project(self.dropout(x)), self.projected_b())  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up_add_(y, self.project(self.dropout(x)), self.projected_b())  # y += s B' A drop(x)

    def delta_weight(self) -> Tensor:
        with torch.no_grad():
            return self.scaling * (self.projected_b().float() @ self.lora_A.float())  # (out, in)

    def lowered(self) -> None:
        return None  # the disk factors are B, not B': exporting them as plain LoRA would drop the projection

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"salora_safety_basis": "salora_safety_basis"}
