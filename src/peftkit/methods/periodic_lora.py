"""PeriodicLoRA (PLoRA): train LoRA for a stage, unload it into the base weight, restart; the total update's rank grows
with the number of stages at LoRA's memory cost.

Paper: Meng et al., "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA Optimization", arXiv 2402.16141
(no official code located).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .inits import init_factors
from .lora import LoraAdapter, LoraConfig

__all__ = ["PeriodicLoraConfig", "PeriodicLoraAdapter"]

STAGE_INITS = (True, False, "gaussian")  # inits that leave the base weight alone


@register_config
@dataclass(frozen=True, kw_only=True)
class PeriodicLoraConfig(LoraConfig):
    """LoRA fields plus the stage schedule.

    plora_stage_steps: T_s >= 1, optimizer steps per stage (unload after steps T_s, 2 T_s, ...).
    plora_momentum: mu in [0, 1); each unload moves (1 - mu) of s B A into the base and keeps mu B (mu = 0: full
      unload, then A is re-initialized and B = 0). plora_max_stages: K >= 0, unloads kept (they are persisted as
      stacked rank-r factors of K r rows); after K unloads training continues as plain LoRA. K = 0: plain LoRA.
    """

    peft_type: ClassVar[str] = "PERIODIC_LORA"
    method_name: ClassVar[str] = "periodic_lora"

    plora_stage_steps: int = 100
    plora_momentum: float = 0.0
    plora_max_stages: int = 8

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ConfigError("use_dora", "PeriodicLoRA unloads plain LoRA stages; set use_dora=False")
        if self.init_lora_weights not in STAGE_INITS or not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError("init_lora_weights", f"PeriodicLoRA restarts stages from scratch; use one of "
                                                   f"{STAGE_INITS}, got {self.init_lora_weights!r}")
        for name, low in (("plora_stage_steps", 1), ("plora_max_stages", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        mu = self.plora_momentum
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1:
            raise ConfigError("plora_momentum", f"must be in [0, 1), got {mu!r}")

    def for_original_base(self) -> PeriodicLoraConfig:
        """The saved stages and the live one as one rank-(K+1) r LoRA with the same s (K = 0: nothing to unload)."""
        k = self.plora_max_stages + 1
        grow = math.sqrt(k) if self.use_rslora else k
        rank = {key: k * v for key, v in self.rank_pattern.items()}
        keys = set(self.rank_pattern) | set(self.alpha_pattern)
        alphas = {key: self.alpha_pattern.get(key, self.lora_alpha) * grow for key in keys}
        return self.replace(r=k * self.r, lora_alpha=self.lora_alpha * grow, rank_pattern=rank, alpha_pattern=alphas,
                            plora_max_stages=0, init_lora_weights=True)


@register_adapter("periodic_lora", PeriodicLoraConfig)
class PeriodicLoraAdapter(LoraAdapter):
    """PeriodicLoRA (arXiv 2402.16141): LoRA forward; after every T_s optimizer steps (on_step), unload:

      W <- W + (1 - mu) s B A        (shift_base: recorded in init_delta, so delete/unload restore W_0)
      B <- mu B                       (the function is unchanged across the unload)
      mu = 0: A <- kaiming, B <- 0, and their optimizer state is dropped (on_step returns them).

    The unloaded part is kept as stacked factors, persistent buffers: plora_past_A (K r, in_flat) holds A, and
    plora_past_B (out, K r) holds (1 - mu) s B, so W_T - W_0 = past_B @ past_A (rank <= stages r). Loading onto the
    original base sets init_delta = -past_B @ past_A (after_load). Merge: W' = W + s B A (the live stage).
    """

    capabilities = LoraAdapter.capabilities

    def __init__(self, ops: LayerOps, config: PeriodicLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        rows, dtype, device = config.plora_max_stages * config.r, self.lora_A.dtype, self.lora_A.device
        self.register_buffer("plora_past_A", torch.zeros(rows, ops.in_features, dtype=dtype, device=device))
        self.register_buffer("plora_past_B", torch.zeros(ops.out_features, rows, dtype=dtype, device=device))
        self.register_buffer("plora_stages", torch.zeros(1, dtype=dtype, device=device))  # unloads done so far
        self._warned = False

    def stages(self) -> int:
        return int(self.plora_stages.item())

    def past_delta(self) -> Tensor:
        """W_now - W_0 from the unloads so far: past_B @ past_A, (out, in_flat) fp32."""
        return self.plora_past_B.float() @ self.plora_past_A.float()

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        c = self.config
        if step < 1 or step % c.plora_stage_steps:
            return None
        if self.stages() >= c.plora_max_stages:
            if c.plora_max_stages and not self._warned:
                warnings.warn(f"PeriodicLoRA: plora_max_stages={c.plora_max_stages} unloads done; training continues "
                              "as plain LoRA (raise plora_max_stages for more stages)", UserWarning, stacklevel=2)
                self._warned = True
            return None
        return self.unload()

    @torch.no_grad()
    def unload(self) -> list[nn.Parameter] | None:
        """One stage end: move (1 - mu) s B A into the base and into the next slot of the stacked factors."""
        c, r, k = self.config, self.config.r, self.stages()
        a = self.ops.flat(self.lora_A).float()  # (r, in_flat)
        b = self.ops.flat(self.lora_B).float() * ((1 - c.plora_momentum) * self.scaling)  # (out, r)
        self.plora_past_A[k * r:(k + 1) * r] = a.to(self.plora_past_A.dtype)
        self.plora_past_B[:, k * r:(k + 1) * r] = b.to(self.plora_past_B.dtype)
        self.plora_stages += 1
        self.shift_base(b @ a)  # (out, in_flat)
        if c.plora_momentum > 0:
            self.lora_B.mul_(c.plora_momentum)
            return None
        a0, b0, _ = init_factors(True, self.ops.weight2d(), r, self.scaling, self.ops.kind == "embedding")
        self.lora_A.copy_(a0.reshape(self.lora_A.shape))  # (r, in...)
        self.lora_B.copy_(b0.reshape(self.lora_B.shape))  # (out, r...)
        return [self.lora_A, self.lora_B]

    def after_load(self) -> None:
        """A checkpoint applies to the original base: the stored unloads go back into it when the adapter joins."""
        self.init_delta = -self.past_delta() if self.stages() else None

    def state_for_original_base(self) -> dict[str, Tensor]:
        """W_0 + past_B past_A + s B A = W_0 + s [B, past_B / s] [A; past_A]: rank (K + 1) r, no stages left."""
        r_all = self.plora_past_A.shape[0] + self.config.r
        a = torch.cat([self.ops.flat(self.lora_A.detach()), self.plora_past_A])  # ((K+1) r, in_flat)
        b = torch.cat([self.ops.flat(self.lora_B.detach()), self.plora_past_B / self.scaling], dim=1)  # (out, (K+1) r)
        empty = self.plora_past_A.new_zeros
        return {"lora_A": a.reshape(self.ops.a_shape(r_all)), "lora_B": b.reshape(self.ops.b_shape(r_all)),
                "plora_past_A": empty(0, a.shape[1]), "plora_past_B": empty(b.shape[0], 0),
                "plora_stages": empty(1)}

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {n: n for n in ("plora_past_A", "plora_past_B", "plora_stages")}
