"""RoseLoRA: LoRA whose factors are pruned to row-wise (A) and column-wise (B) sparsity by EMA importance.

Paper: Wang et al., "RoseLoRA: Row and Column-wise Sparse Low-rank Adaptation of Pre-trained Language Model for
Knowledge Editing and Fine-tuning", arXiv 2406.10777 (reference code: EasyEdit `models/roselora/roselora_main.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .lora import LoraAdapter, LoraConfig
from .rank_budget import sensitivity

__all__ = ["RoseLoraConfig", "RoseLoraAdapter", "keep_rate", "keep_count"]

PLAIN_INITS = (True, False, "gaussian")  # inits that leave the base weight alone


def keep_rate(t: int, rho: float, t_full: int, t_burn: int) -> float:
    """rho_t: 1 for t < t_full, rho + (1 - rho)(1 - (t - t_full)/(t_burn - t_full))^3 until t_burn, rho after."""
    if t < t_full:
        return 1.0
    if t < t_burn:
        return rho + (1 - rho) * (1 - (t - t_full) / (t_burn - t_full)) ** 3
    return rho


def keep_count(rate: float, n: int) -> int:
    """Entries kept out of n at keep rate `rate`: ceil(rate * n), at least 1 (the 1e-9 absorbs float noise)."""
    return min(n, max(1, math.ceil(rate * n - 1e-9)))


def _row_top_mask(imp: Tensor, k: int) -> Tensor:
    """Boolean mask (rows, n) keeping the k largest entries of every row of imp (ties: exactly k kept)."""
    mask = torch.zeros_like(imp, dtype=torch.bool)  # (rows, n)
    return mask.scatter_(1, imp.topk(k, dim=1).indices, True)


@register_config
@dataclass(frozen=True, kw_only=True)
class RoseLoraConfig(LoraConfig):
    """LoRA fields plus the sparsity schedule (peft_type "ROSELORA"; peft has no such method).

    rose_keep_ratio: rho in (0, 1], the final fraction of entries kept in each row of A and each column of B
      (default 0.1 for fine-tuning; the paper's knowledge-editing setting is 0.05).
    rose_full_steps / rose_burn_steps: t_full < t_burn of the cubic keep-rate schedule, counted in optimizer steps
      already taken (step 1 of the loop is t = 0, as the reference's iteration counter). rose_beta: the EMA factor
    of the importance |w * dL/dw|. rose_clamp: None, or c > 0 to clamp A and B to [-c, c] after masking (the
    reference editing code uses 3e-3).
    """

    peft_type: ClassVar[str] = "ROSELORA"
    method_name: ClassVar[str] = "roselora"

    rose_keep_ratio: float = 0.1
    rose_full_steps: int = 3
    rose_burn_steps: int = 20
    rose_beta: float = 0.8
    rose_clamp: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ConfigError("use_dora", "RoseLoRA sparsifies plain LoRA factors; set use_dora=False")
        if self.init_lora_weights not in PLAIN_INITS or not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError("init_lora_weights", f"RoseLoRA keeps the base weight; use one of {PLAIN_INITS}, "
                                                   f"got {self.init_lora_weights!r}")
        _check_fraction("rose_keep_ratio", self.rose_keep_ratio, low_open=True, high_open=False)
        _check_fraction("rose_beta", self.rose_beta, low_open=False, high_open=True)
        for name in ("rose_full_steps", "rose_burn_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(name, f"must be an integer >= 0, got {value!r}")
        if self.rose_burn_steps <= self.rose_full_steps:
            raise ConfigError("rose_burn_steps", f"must exceed rose_full_steps={self.rose_full_steps}, got "
                                                 f"{self.rose_burn_steps}")
        c = self.rose_clamp
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf):
            raise ConfigError("rose_clamp", f"must be None or a finite number > 0, got {c!r}")

    def for_original_base(self) -> RoseLoraConfig:
        return self  # RoseLoRA never changes the base weight


def _check_fraction(name: str, value, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ConfigError(name, f"must be a number in {interval}, got {value!r}")


@register_adapter("roselora", RoseLoraConfig)
class RoseLoraAdapter(LoraAdapter):
    """RoseLoRA (arXiv 2406.10777): LoRA forward y = W x + b + s * B A drop(x), s as LoRA's, with sparse factors.

    Before each optimizer step (gradients present, weights not yet updated, as the reference code):
        I_A <- beta I_A + (1 - beta) |A * dL/dA|,  I_B likewise (I = the first score at the first update).
    After optimizer step t (0-based), with rho_t from `keep_rate`: if rho_t < 1, every row of A keeps its
    ceil(rho_t * in) most important entries and every column of B its ceil(rho_t * out); the rest become 0.
    Merge: W' = W + s * B A (exact). Identity at init (B = 0). Training checkpoints keep I_A, I_B (non-persistent
    buffers) and the step they last scored (train_scalars: before it, the first score initializes I).
    """

    capabilities = LoraAdapter.capabilities
    train_scalars = ("_scored_at",)

    def __init__(self, ops: LayerOps, config: RoseLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        imp = dict(dtype=torch.float32, device=self.lora_A.device)
        self.register_buffer("rose_imp_A", torch.zeros(self.lora_A.shape, **imp), persistent=False)  # (r, in...)
        self.register_buffer("rose_imp_B", torch.zeros(self.lora_B.shape, **imp), persistent=False)  # (out, r...)
        self._scored_at: int | None = None  # the step whose gradients the importance has seen

    @torch.no_grad()
    def update_importance(self, step: int) -> None:
        """EMA of |w * g| for A and B (once per step)."""
        beta = self.config.rose_beta
        for p, imp in ((self.lora_A, self.rose_imp_A), (self.lora_B, self.rose_imp_B)):
            s = sensitivity(p).float()  # same shape as p
            if self._scored_at is None:
                imp.copy_(s)
            else:
                imp.mul_(beta).add_(s, alpha=1 - beta)
        self._scored_at = step

    def before_optimizer_step(self, step: int) -> None:
        self.update_importance(step)

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        if self._scored_at != step:  # a loop without the pre-step hook: score with the updated weights
            self.update_importance(step)
        c = self.config
        rate = keep_rate(step - 1, c.rose_keep_ratio, c.rose_full_steps, c.rose_burn_steps)
        if rate < 1:
            self.apply_masks(rate)
        return None

    @torch.no_grad()
    def apply_masks(self, rate: float) -> None:
        """Zero all but the top ceil(rate * in) entries of each row of A and ceil(rate * out) of each column of B."""
        flat = self.ops.flat
        imp_a, imp_b = flat(self.rose_imp_A), flat(self.rose_imp_B)  # (r, in_flat), (out, r)
        keep_a = _row_top_mask(imp_a, keep_count(rate, imp_a.shape[1]))  # (r, in_flat)
        keep_b = _row_top_mask(imp_b.T, keep_count(rate, imp_b.shape[0])).T  # (out, r)
        self.lora_A.mul_(keep_a.reshape(self.lora_A.shape))
        self.lora_B.mul_(keep_b.reshape(self.lora_B.shape))
        if self.config.rose_clamp is not None:
            self.lora_A.clamp_(-self.config.rose_clamp, self.config.rose_clamp)
            self.lora_B.clamp_(-self.config.rose_clamp, self.config.rose_clamp)
