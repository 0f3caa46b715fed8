"""LoRA-GGPO: LoRA whose training forward runs at a random point around (A, B), sized by gradient and weight norms.

Paper: Chang et al., "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation
Optimization", arXiv 2502.14538 (authors' code: llm172/LoRA-GGPO, not reachable when this was written).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .lora import LoraAdapter, LoraConfig

__all__ = ["LoraGgpoConfig", "LoraGgpoAdapter"]


def _check_nonneg(field_name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(field_name, f"must be a finite number >= 0, got {value!r}")


@register_config
@dataclass(frozen=True, kw_only=True)
class LoraGgpoConfig(LoraConfig):
    """LoRA fields plus the perturbation: ggpo_sigma (relative size; 0 = plain LoRA training), ggpo_grad_coef and
    ggpo_weight_coef (weights of the previous-gradient and weight row norms), ggpo_beta (EMA factor of the
    gradient row norms, in [0, 1)). Saved with peft_type "LORA_GGPO" (peft has no such method)."""

    peft_type: ClassVar[str] = "LORA_GGPO"
    method_name: ClassVar[str] = "lora_ggpo"

    ggpo_sigma: float = 0.05
    ggpo_grad_coef: float = 0.5
    ggpo_weight_coef: float = 0.5
    ggpo_beta: float = 0.9

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ConfigError("use_dora", "LoRA-GGPO perturbs plain LoRA factors; set use_dora=False")
        for name in ("ggpo_sigma", "ggpo_grad_coef", "ggpo_weight_coef"):
            _check_nonneg(name, getattr(self, name))
        beta = self.ggpo_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ConfigError("ggpo_beta", f"must be in [0, 1) (an EMA factor), got {beta!r}")


@register_adapter("lora_ggpo", LoraGgpoConfig)
class LoraGgpoAdapter(LoraAdapter):
    """LoRA-GGPO (arXiv 2502.14538): LoRA, trained with the gradient taken at a perturbed point.

    In training, for X in {A, B} (as (rows, cols) matrices) and n ~ N(0, I) drawn afresh on each forward:
      eps_X[i] = sigma * (c_g * G_X[i] + c_w * ||X[i]||) / sqrt(cols) * n[i]    (no gradient through eps)
      y = W x + b + s (B + eps_B) (A + eps_A) drop(x)
    so dL/dA, dL/dB are the gradients at (A + eps_A, B + eps_B) while A, B themselves never change: the optimizer
    steps from the unperturbed point. G_X is an EMA (factor beta) of the row norms of dL/dX, kept by tensor hooks on
    the parameters. In eval (or while the base layer is in eval mode) the forward is LoRA's, as is the merge.
    """

    capabilities = LoraAdapter.capabilities

    def __init__(self, ops: LayerOps, config: LoraGgpoConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        rows_a, rows_b = self.lora_A.shape[0], self.lora_B.shape[0]
        device = self.lora_A.device
        self.register_buffer("ggpo_grad_A", torch.zeros(rows_a, device=device), persistent=False)  # (r,)
        self.register_buffer("ggpo_grad_B", torch.zeros(rows_b, device=device), persistent=False)  # (out,)
        self._seen: set[str] = set()  # EMAs that received a gradient
        self._hooked: tuple[weakref.ref, ...] = ()  # the parameter objects carrying our hooks

    # --- perturbation -------------------------------------------------------------------------------------------
    def perturbs(self) -> bool:
        """Training forward with sigma > 0. The base layer's mode counts too: an adapter added to a model in eval
        mode starts as a fresh (training-mode) module, and must not add noise there."""
        return self.training and self.ops.module.training and self.config.ggpo_sigma > 0

    def row_scale_of_noise(self, x: Tensor, grad_norm: Tensor) -> Tensor:
        """sigma * (c_g G + c_w ||X_row||) / sqrt(cols): the per-row std of eps_X."""
        c, flat = self.config, self.ops.flat(x.detach()).float()  # (rows, cols)
        norms = c.ggpo_grad_coef * grad_norm + c.ggpo_weight_coef * torch.linalg.vector_norm(flat, dim=1)  # (rows,)
        return c.ggpo_sigma * norms / math.sqrt(flat.shape[1])

    @torch.no_grad()
    def perturbation(self) -> tuple[Tensor, Tensor]:
        """(eps_A, eps_B) in the factors' shapes; draws eps_A first, then eps_B, from the global generator."""
        out = []
        for p, g in ((self.lora_A, self.ggpo_grad_A), (self.lora_B, self.ggpo_grad_B)):
            scale = self.row_scale_of_noise(p, g)  # (rows,)
            noise = torch.randn(self.ops.flat(p).shape, device=p.device, dtype=torch.float32)  # (rows, cols)
            out.append((scale[:, None] * noise).to(p.dtype).view(p.shape))
        return out[0], out[1]

    # --- gradient-norm EMA ----------------------------------------------------------------------------------------
    def _ensure_hooks(self) -> None:
        """Register the EMA hooks once per parameter object (deepcopy drops tensor hooks, so re-check)."""
        params = (self.lora_A, self.lora_B)
        if len(self._hooked) == 2 and all(ref() is p for ref, p in zip(self._hooked, params, strict=True)):
            return
        self.lora_A.register_hook(self._track_a)
        self.lora_B.register_hook(self._track_b)
        self._hooked = tuple(weakref.ref(p) for p in params)

    def _track_a(self, grad: Tensor) -> None:
        self._track("A", self.ggpo_grad_A, grad)

    def _track_b(self, grad: Tensor) -> None:
        self._track("B", self.ggpo_grad_B, grad)

    @torch.no_grad()
    def _track(self, key: str, ema: Tensor, grad: Tensor) -> None:
        """G <- beta G + (1 - beta) ||grad_row|| (the first gradient sets G)."""
        norms = torch.linalg.vector_norm(self.ops.flat(grad).float(), dim=1)  # (rows,)
        if key in self._seen:
            ema.mul_(self.config.ggpo_beta).add_(norms, alpha=1 - self.config.ggpo_beta)
        else:
            ema.copy_(norms)
            self._seen.add(key)

    # --- training checkpoints --------------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Tensor]:
        """The EMA buffers and which of them received a gradient ("ggpo_seen": [A, B]; the first one sets G)."""
        return super().train_state() | {"ggpo_seen": torch.tensor([key in self._seen for key in "AB"])}

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        self._seen = {key for key, seen in zip("AB", state["ggpo_seen"].tolist(), strict=True) if seen}
        super().load_train_state({k: t for k, t in state.items() if k != "ggpo_seen"})

    # --- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        if not self.perturbs():
            return super().forward(x, z)
        self._ensure_hooks()
        eps_a, eps_b = self.perturbation()
        a, b = self.lora_A + eps_a, self.lora_B + eps_b  # (r, in...), (out, r...): gradients reach A and B
        h = self.ops.down(self.cast_input(self.dropout(x), a), a) * self.scaling  # (..., r)
        y = self.ops.up(h, b)  # (..., out)
        if self.lora_B_bias is not None:
            y = y + self.ops.channel(self.lora_B_bias) * self.scaling
        return y

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        if not self.perturbs():
            return super().add_to(y, x, z)
        return y + self.forward(x, z).to(y.dtype)
