"""LoRA Dropout: Bernoulli masks on the input columns of A and the output rows of B (arXiv 2404.09610).

Training samples one mask pair per forward; evaluation is deterministic with the expected delta (1 - p)^2 s B A;
`ensemble_predict` averages output probabilities over N mask draws at test time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .lora import LoraAdapter, LoraConfig

if TYPE_CHECKING:
    from ..core.model import AdapterModel

__all__ = ["LoraDropoutConfig", "LoraDropoutAdapter", "ensemble_predict"]


@register_config
@dataclass(frozen=True, kw_only=True)
class LoraDropoutConfig(LoraConfig):
    """LoRA's fields plus loradropout_p (probability of dropping a column of A / a row of B, in [0, 1)) and
    loradropout_ensemble (N forward passes averaged by `ensemble_predict`)."""

    peft_type: ClassVar[str] = "LORADROPOUT"
    method_name: ClassVar[str] = "loradropout"

    loradropout_p: float = 0.1
    loradropout_ensemble: int = 5

    def validate(self) -> None:
        super().validate()
        p = self.loradropout_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError("loradropout_p", f"must be a number in [0, 1) (0 = plain LoRA), got {p!r}")
        n = self.loradropout_ensemble
        if type(n) is not int or n < 1:
            raise ConfigError("loradropout_ensemble", f"must be an integer >= 1 (forward passes), got {n!r}")
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(name, f"LoRA Dropout has no {name} variant; set {name}=False")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError("init_lora_weights", "LoRA Dropout supports True, False or 'gaussian' (an init that "
                                                   "moves the base weight would not be undone by the (1-p)^2 "
                                                   f"evaluation scale), got {self.init_lora_weights!r}")

    def for_original_base(self) -> LoraDropoutConfig:
        return self  # no accepted init changes the base weight


@register_adapter("loradropout", LoraDropoutConfig)
class LoraDropoutAdapter(LoraAdapter):
    """LoRA Dropout (arXiv 2404.09610): y = W x + b + s (m_B * B)(A * m_A) drop(x) while sampling masks,
    m_A in {0,1}^in and m_B in {0,1}^out ~ Bernoulli(1 - p), one pair per forward shared by every token,
    no 1/(1-p) rescale. Deterministic (eval): y = W x + b + (1 - p)^2 s B A drop(x) = E[sampled].

    Masks are sampled in training mode, or when `sample_masks` is set (`ensemble_predict` sets it, so other
    dropout stays off). Merge (deterministic): W' = W + (1 - p)^2 s B A, exact; lowered: scale (1 - p)^2 s.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: LoraDropoutConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        self.train(ops.module.training)  # start in the base layer's mode: an eval model stays deterministic
        self.keep = 1.0 - config.loradropout_p
        self.scaling = config.scaling * self.keep**2  # deterministic scale: LoRA's project/merge/lowered use it
        self.sample_masks = False  # plain attribute: sampling without .train() (test-time ensemble)

    def sampling(self) -> bool:
        return self.keep < 1 and (self.training or self.sample_masks)

    def draw_masks(self) -> tuple[Tensor, Tensor]:
        """(m_A (in,), m_B (out,)) ~ Bernoulli(1 - p), from torch's global generator; `in` is A's second dim
        (input channels of a conv kernel, vocabulary rows of an embedding)."""
        a, b = self.lora_A, self.lora_B
        m_a = torch.bernoulli(torch.full((a.shape[1],), self.keep, dtype=a.dtype, device=a.device))  # (in,)
        m_b = torch.bernoulli(torch.full((b.shape[0],), self.keep, dtype=b.dtype, device=b.device))  # (out,)
        return m_a, m_b

    def masked_factors(self, m_a: Tensor, m_b: Tensor) -> tuple[Tensor, Tensor]:
        """(A * m_A, m_B * B) in the factors' stored shapes: columns of A and rows of B zeroed."""
        a, b = self.lora_A, self.lora_B
        a_m = a * m_a.reshape(1, -1, *(1,) * (a.dim() - 2))  # (r, in...)
        b_m = b * m_b.reshape(-1, *(1,) * (b.dim() - 1))  # (out, r...)
        return a_m, b_m

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        if not self.sampling():
            return super().forward(x, z)
        a, b = self.masked_factors(*self.draw_masks())
        h = self.ops.down(self.cast_input(self.dropout(x), a), a) * self.config.scaling  # (..., r), no rescale
        return self.ops.up(h, b)  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        if self.sampling():
            return y + self.forward(x, z).to(y.dtype)
        return super().add_to(y, x, z)


def ensemble_predict(model: AdapterModel, run: Callable[[], Tensor], n: int | None = None) -> Tensor:
    """Test-time ensemble: the mean of softmax(run()) over n passes with fresh masks in every LoRA Dropout
    adapter of `model`. n defaults to the first adapter's loradropout_ensemble. Only the
    adapters' `sample_masks` flag changes (other dropout stays as the model's mode has it); it is restored even
    if `run` raises. Deterministic under a fixed torch seed. Returns probabilities (..., V) in fp32."""
    adapters = [a for _, host in model.hosts() for a in getattr(host, "adapters", {}).values()
                if isinstance(a, LoraDropoutAdapter)]
    if not adapters:
        raise ConfigError("model", "has no LoRA Dropout adapter; add one with LoraDropoutConfig first")
    n = adapters[0].config.loradropout_ensemble if n is None else n
    if type(n) is not int or n < 1:
        raise ConfigError("n", f"must be an integer >= 1 (forward passes), got {n!r}")
    before = [a.sample_masks for a in adapters]
    try:
        for a in adapters:
            a.sample_masks = True
        with torch.no_grad():
            return sum(torch.softmax(run().float(), dim=-1) for _ in range(n)) / n  # (..., V)
    finally:
        for a, flag in zip(adapters, before, strict=True):
            a.sample_masks = flag
