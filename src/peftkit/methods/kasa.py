"""KaSA: knowledge-aware singular-value adaptation, a LoRA variant selected by `LoraConfig(kasa_config={...})`.

Paper: Wang et al., "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models", arXiv 2412.06071
(reference code juyongjiang/KaSA; peft's port: `LoraConfig(kasa_config=KasaConfig(beta, gamma))`,
`tuners/lora/variants.py::KasaLinearVariant`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext, LowRank
from ..core.layers import LayerOps
from ..core.registry import register_adapter
from ..errors import ConfigError, UnsupportedLayerError
from .lora import LoraAdapter, LoraConfig

__all__ = ["KasaAdapter", "check_kasa_config", "dropped_component", "KASA_DEFAULTS"]

KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}  # peft's KasaConfig defaults (the reference GLUE values)
KASA_INITS = (True, False, "gaussian")  # inits that leave the base weight to KaSA's own truncation


def check_kasa_config(config: LoraConfig) -> None:
    """Validate `kasa_config` (a dict of peft's KasaConfig fields) and the LoRA fields it cannot be combined with."""
    value = config.kasa_config
    if not isinstance(value, dict):
        raise ConfigError("kasa_config", f"must be a dict {{'beta', 'gamma'}} or None, got {type(value).__name__}")
    unknown = sorted(set(value) - set(KASA_DEFAULTS))
    if unknown:
        raise ConfigError("kasa_config", f"unknown keys {unknown}; valid: beta, gamma")
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError("kasa_config", f"{key} must be a finite number >= 0, got {v!r}")
    if config.use_dora:
        raise ConfigError("use_dora", "KaSA cannot be combined with DoRA; set use_dora=False or kasa_config=None")
    if not any(config.init_lora_weights is i or config.init_lora_weights == i for i in KASA_INITS):
        raise ConfigError("init_lora_weights", f"KaSA truncates the base itself; use one of {KASA_INITS}, got "
                                               f"{config.init_lora_weights!r}")


def dropped_component(w2d: Tensor, r: int) -> Tensor:
    """The r smallest singular components of W (out, in) as one (out, in) fp32 matrix: W_t = W - this."""
    u, s, vh = torch.linalg.svd(w2d.detach().float(), full_matrices=False)  # (out, k), (k,), (k, in)
    keep = s.numel() - r
    return (u[:, keep:] * s[keep:]) @ vh[keep:]  # (out, in)


@register_adapter("kasa", LoraConfig, config_defaults={"kasa_config": {}},
                  selects=lambda c: c.kasa_config is not None)
class KasaAdapter(LoraAdapter):
    """KaSA (arXiv 2412.06071): y = W_t x + b + s * B diag(d) A drop(x), W_t = W minus its r smallest singular
    components (the rank-(k - r) truncation, k = min(out, in)).

    A (r, in) kaiming-uniform, B (out, r) = 0, d = `lora_diag` (r,) ~ N(0, 1): B = 0 makes the update zero at init,
    so the output at init is the truncated base's, not the original's. The truncation is `init_delta`, recomputed
    from the base every time the adapter is built, also when loading (as peft does): a checkpoint applies to the
    original base. extra_losses: beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F), averaged over layers.
    Merge: W' = W_t + s B diag(d) A, exact; deleting the adapter gives the original W back.
    """

    capabilities = frozenset({"mergeable", "servable"})

    @classmethod
    def check_config(cls, config: LoraConfig) -> None:
        check_kasa_config(config)

    def __init__(self, ops: LayerOps, config: LoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"KaSA supports Linear and Conv1D layers, not a {ops.kind} layer; "
                                        "narrow target_modules")
        k = min(ops.out_features, ops.in_features)
        if config.r >= k:
            raise ConfigError("r", f"KaSA drops r singular components and needs r < min(out, in) = {k} on every "
                                   "target layer; lower r or set rank_pattern for this layer")
        super().__init__(ops, config, initialize, ctx)
        dtype, device = self.lora_A.dtype, self.lora_A.device
        diag = torch.randn(config.r) if initialize else torch.zeros(config.r)
        self.lora_diag = nn.Parameter(diag.to(dtype=dtype, device=device))  # (r,)
        self.init_delta = dropped_component(ops.weight2d(), config.r)  # (out, in): the base gives this up
        self.layers = max(1, len(ctx.targets)) if ctx is not None else 1
        self.beta = config.kasa_config.get("beta", KASA_DEFAULTS["beta"])
        self.gamma = config.kasa_config.get("gamma", KASA_DEFAULTS["gamma"])

    def project(self, x: Tensor) -> Tensor:
        """s * diag(d) A x: LoRA's forward and fused add then apply B."""
        return super().project(x) * self.lora_diag  # (..., r)

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        b = flat(self.lora_B).float() * self.lora_diag.float()  # (out, r)
        return self.scaling * (b @ flat(self.lora_A).float())  # (out, in)

    def lowered(self) -> LowRank:
        return LowRank(self.lora_A * self.lora_diag.detach()[:, None], self.lora_B, self.scaling)

    def extra_losses(self) -> dict[str, Tensor]:
        """This layer's share of the KaSA regularizer (the model sums the shares: the mean over layers)."""
        a, b, d = self.lora_A.float(), self.lora_B.float(), self.lora_diag.float()
        eye = torch.eye(d.numel(), device=d.device)
        ortho = torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
        return {"kasa": (self.beta * d.square().sum() + self.gamma * ortho) / self.layers}

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"lora_diag": "lora_diag"}

    def optional_disk_names(self) -> dict[str, tuple[int, ...]]:
        return {}  # nothing to carry: loading recomputes the truncation from the original base

    def state_for_original_base(self) -> dict[str, Tensor] | None:
        return None  # the saved adapter already applies to the original base
