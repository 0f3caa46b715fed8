"""LoRA-GA: LoRA whose factors come from the SVD of the full-fine-tuning gradient (arXiv 2407.05000).

Init (authors' code, Outsider565/LoRA-GA `lora_ga_init`): G = mean dL/dW over the calibration batches
(core.calibrate "grad"); rank-2r randomized SVD G ~ U S V^T (torch.svd_lowrank, q = min(4r, min(out, in)),
niter=4, under a fixed seed so the init is deterministic); direction "ArB2r": A = V[:, :r]^T, B = U[:, r:2r]
(also "ArBr", "A2rBr", "random"); scale "stable": A and B both times zeta = out^(1/4) / sqrt(gamma). The base
gives up s*B@A (W_res = W - s B A), so the model is unchanged at init. peft's port differs: it multiplies B by
the singular values S and scales only B; adapters from either load the same (the forward is plain LoRA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter
from ..errors import ConfigError
from .inits import check_lora_ga_config
from .lora import LoraAdapter, LoraConfig

__all__ = ["LoraGaAdapter", "lora_ga_factors", "SVD_SEED"]

SVD_SEED = 0  # seeds the randomized SVD (and the "random" direction): the same G gives the same factors
DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}


def _svd(g: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-2r left/right singular vectors of G: U (out, 2r), V (in, 2r), and a seeded permutation of 2r."""
    devices = [g.device.index or 0] if g.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        u, _, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)  # (out, q), (q,), (in, q)
        perm = torch.randperm(2 * r)  # (2r,), used by direction "random"
    return u[:, :2 * r], v[:, :2 * r], perm


def lora_ga_factors(g: Tensor, r: int, s: float, options: dict | None = None) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) from the gradient G (out, in) and the adapter scale s, as the authors' code."""
    opts = DEFAULTS | (options or {})
    if 2 * r > min(g.shape):
        raise ConfigError("r", f"LoRA-GA takes 2r={2 * r} singular directions but this layer has min(out, in)="
                               f"{min(g.shape)}; lower r or set rank_pattern for this layer")
    u, v, perm = _svd(g.detach().float(), r)  # (out, 2r), (in, 2r)
    vh = v.T  # (2r, in)
    pick = {"ArB2r": (slice(0, r), slice(r, 2 * r)), "A2rBr": (slice(r, 2 * r), slice(0, r)),
            "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)), "random": (perm[:r], perm[r:])}
    ia, ib = pick[opts["direction"]]
    a, b = vh[ia], u[:, ib]  # (r, in), (out, r)
    scale = opts["scale"]
    if scale == "stable":
        zeta = g.shape[0] ** 0.25 / opts["stable_gamma"] ** 0.5
        a, b = a * zeta, b * zeta
    elif scale == "gd_scale":
        a, b = a / s, b / s
    elif scale == "weight_svd":
        raise ConfigError("lora_ga_config", "scale='weight_svd' can be loaded but peftkit does not compute it; "
                                            "use 'stable', 'unit' or 'gd_scale'")
    return a.contiguous(), b.contiguous()


@register_adapter("lora_ga", LoraConfig, config_defaults={"init_lora_weights": "lora_ga"},
                  selects=lambda c: c.init_lora_weights == "lora_ga")
class LoraGaAdapter(LoraAdapter):
    """LoRA-GA (arXiv 2407.05000): y = W_res x + b + s * B A drop(x), W_res = W - s B0 A0, A0/B0 from SVD(G).

    Training and merging are plain LoRA. Needs calibration batches (`calibration = {"grad"}`); loading a saved
    adapter (initialize=False) computes nothing and expects the residual base, as peft does. save_adapter(...,
    original_base=True) writes the rank-2r LoRA s [B_t, -B0] [A_t; A0] for the untouched base.
    """

    calibration = frozenset({"grad"})

    @classmethod
    def check_config(cls, config: LoraConfig) -> None:
        check_lora_ga_config(config.lora_ga_config)
        if config.use_dora:
            raise ConfigError("init_lora_weights", "'lora_ga' cannot be combined with use_dora=True; drop one")

    def __init__(self, ops: LayerOps, config: LoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        self._calibrated = False

    def _initialize(self, config: LoraConfig) -> None:
        """Nothing to compute from W alone: the factors come from `calibrate` (they stay zero until then)."""

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        a, b = lora_ga_factors(stats["grad"], self.config.r, self.scaling, self.config.lora_ga_config)
        with torch.no_grad():
            self.lora_A.copy_(a.reshape(self.lora_A.shape))  # (r, in...)
            self.lora_B.copy_(b.reshape(self.lora_B.shape))  # (out, r...)
            self.init_delta = self.delta_weight()  # (out, in_flat) = s B0 A0, from the factors as stored
        self.register_buffer("init_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("init_B", self.lora_B.detach().clone(), persistent=False)
        self._calibrated = True

    def state_for_original_base(self) -> dict[str, Tensor] | None:
        if not self._calibrated:
            raise ConfigError("original_base", "this LoRA-GA adapter was loaded, not initialized here, so the "
                                               "original base weight is unknown; save it with original_base=False")
        return super().state_for_original_base()
