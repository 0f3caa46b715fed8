"""BA-LoRA: PiSSA-initialized LoRA plus three output-space regularizers (consistency, diversity, SVD)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .inits import init_factors, parse_init
from .lora import LoraAdapter, LoraConfig

__all__ = ["BaLoraConfig", "BaLoraAdapter", "nlg_terms", "nlu_terms", "top_k_energy"]

TASKS = ("nlg", "nlu")
BASE_TAKING_INITS = ("pissa", "olora", "nlora")


@register_config
@dataclass(frozen=True, kw_only=True)
class BaLoraConfig(LoraConfig):
    """BA-LoRA settings: LoRA's fields (init_lora_weights defaults to "pissa") plus the regularizer weights
    ba_lambda_consistency / ba_lambda_diversity / ba_lambda_svd (>= 0), ba_task ("nlg": logits (B, T, V) of a
    language model; "nlu": logits (B, C) of a classifier) and ba_svd_k (>= 1), the number of top singular
    values whose energy share the SVD term raises."""

    peft_type: ClassVar[str] = "BA_LORA"
    method_name: ClassVar[str] = "ba_lora"

    init_lora_weights: bool | str = "pissa"
    ba_lambda_consistency: float = 1e-4
    ba_lambda_diversity: float = 3e-4
    ba_lambda_svd: float = 1e-4
    ba_task: str = "nlg"
    ba_svd_k: int = 3

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ConfigError("use_dora", "BA-LoRA regularizes a plain LoRA; set use_dora=False")
        for name in ("ba_lambda_consistency", "ba_lambda_diversity", "ba_lambda_svd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"must be a finite number >= 0 (0 turns the term off), got {value!r}")
        if self.ba_task not in TASKS:
            raise ConfigError("ba_task", f"must be one of {TASKS} (nlg: language-model logits (B, T, V), nlu: "
                                         f"classifier logits (B, C)), got {self.ba_task!r}")
        k = self.ba_svd_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError("ba_svd_k", f"must be an integer >= 1, got {k!r}")

    def for_original_base(self) -> BaLoraConfig:
        return self  # the init part is kept in the adapter (ba_init_A/B), the base weight never changes


def top_k_energy(sv: Tensor, k: int) -> Tensor:
    """sum of the top-k singular values / sum of all, over the last dim (sv sorted descending)."""
    return sv[..., :k].sum(-1) / (sv.sum(-1) + 1e-10)


def nlg_terms(logits: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(KL(p0 || p) summed over tokens and vocabulary / batch, -H(p) mean per token, -mean top-k energy of
    each sequence's (T, V) logit matrix). logits, reference: (B, T, V) or (N, V)."""
    z = logits.float().reshape(-1, *logits.shape[-2:]) if logits.dim() > 2 else logits.float()[None]  # (B, T, V)
    z0 = reference.detach().float().reshape(z.shape)  # (B, T, V)
    logp, logp0 = F.log_softmax(z, dim=-1), F.log_softmax(z0, dim=-1)  # (B, T, V)
    consistency = F.kl_div(logp, logp0, reduction="batchmean", log_target=True)
    diversity = (logp.exp() * logp).sum(-1).mean()  # -H(p)
    svd = -top_k_energy(torch.linalg.svdvals(z), k).mean()  # svdvals: (B, min(T, V))
    return consistency, diversity, svd


def nlu_terms(logits: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(MSE of L2-normalized logits, sum of squared off-diagonal covariances over the batch / dim, -top-k
    energy of the (batch, features) matrix). logits, reference: (B, C), or (B, ...) flattened to features."""
    z = logits.float().reshape(logits.shape[0], -1)  # (B, D)
    z0 = reference.detach().float().reshape(z.shape)  # (B, D)
    consistency = F.mse_loss(F.normalize(z, dim=-1), F.normalize(z0, dim=-1))
    zc = z - z.mean(0)  # (B, D)
    cov = zc.T @ zc / max(z.shape[0] - 1, 1)  # (D, D)
    diversity = (cov - torch.diag(torch.diag(cov))).square().sum() / z.shape[1]
    svd = -top_k_energy(torch.linalg.svdvals(z), k)
    return consistency, diversity, svd


@register_adapter("ba_lora", BaLoraConfig)
class BaLoraAdapter(LoraAdapter):
    """BA-LoRA (arXiv 2408.04556): LoRA on a PiSSA init; loss += l1 cons + l2 div + l3 svd on the model output.

    The init factors (A0, B0) stay in the adapter as frozen buffers instead of being cut out of the base weight:
    y = W x + b + s B A drop(x) - s B0 A0 x, the same function as PiSSA's W_res x + s B A drop(x), but the base
    stays the pre-trained model, so the reference logits (adapters disabled) are the pre-trained model's, as
    the paper's consistency term needs. Merge: W' = W + s (B A - B0 A0), exact.
    Regularizers (output_losses, reference = base logits, no gradient) per ba_task: see nlg_terms / nlu_terms.
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})
    needs_reference_output = True

    def __init__(self, ops: LayerOps, config: BaLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize=False, ctx=ctx)
        self.keeps_init = parse_init(config.init_lora_weights)[0] in BASE_TAKING_INITS
        if self.keeps_init:
            dtype, device = self.lora_A.dtype, self.lora_A.device
            self.register_buffer("ba_init_A", torch.zeros(ops.a_shape(config.r), dtype=dtype, device=device))
            self.register_buffer("ba_init_B", torch.zeros(ops.b_shape(config.r), dtype=dtype, device=device))
        if initialize:
            self._initialize(config)

    def _initialize(self, config: BaLoraConfig) -> None:
        w = self.ops.weight2d()
        a, b, _ = init_factors(config.init_lora_weights, w, config.r, self.scaling, self.ops.kind == "embedding")
        with torch.no_grad():
            self.lora_A.copy_(a.reshape(self.lora_A.shape))  # (r, in...)
            self.lora_B.copy_(b.reshape(self.lora_B.shape))  # (out, r...)
            if self.keeps_init:
                self.ba_init_A.copy_(self.lora_A)  # (r, in...)
                self.ba_init_B.copy_(self.lora_B)  # (out, r...)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        y = super().forward(x, z)  # (..., out): s B A drop(x) (+ s b_B)
        if not self.keeps_init:
            return y
        init = self.ops.down(self.cast_input(x, self.ba_init_A), self.ba_init_A) * self.scaling  # (..., r)
        return y - self.ops.up(init, self.ba_init_B)  # exactly 0 at init: both terms are the same computation

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        if not self.keeps_init:
            return super().add_to(y, x, z)
        return y + self.forward(x, z).to(y.dtype)

    def delta_weight(self) -> Tensor:
        delta = super().delta_weight()  # (out, in_flat)
        if self.keeps_init:
            flat = self.ops.flat
            delta = delta - self.scaling * (flat(self.ba_init_B).float() @ flat(self.ba_init_A).float())
        return delta

    def lowered(self) -> None:
        return None

    def disk_names(self) -> dict[str, str]:
        extra = {"ba_init_A": "ba_init_A", "ba_init_B": "ba_init_B"} if self.keeps_init else {}
        return super().disk_names() | extra

    @classmethod
    def output_losses(cls, config: BaLoraConfig, logits: Tensor, reference: Tensor | None) -> dict[str, Tensor]:
        if reference is None:
            raise ConfigError("reference", "BA-LoRA regularizes against the base model's logits; pass them")
        terms = (nlg_terms if config.ba_task == "nlg" else nlu_terms)(logits, reference.detach(), config.ba_svd_k)
        weights = (config.ba_lambda_consistency, config.ba_lambda_diversity, config.ba_lambda_svd)
        names = ("ba_lora_consistency", "ba_lora_diversity", "ba_lora_svd")
        return {name: w * t for name, w, t in zip(names, weights, terms, strict=True)}
