"""DynamicRank-DoRA: gated rank-1 LoRA components pruned by relative contribution (cubic schedule, one global
threshold), with a variance regularizer. Mao et al., arXiv 2405.17357 (code: MIkumikumi0116/DoRA, Finetune_Utils.py).
Registered as "dr_dora": "dora" is the weight-decomposed DoRA (arXiv 2402.09353), a different method."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .common import adapter_dtype, pattern_value
from .lora import LoraConfig
from .rank_budget import LayerGroup, prune_mask

__all__ = ["DrDoraConfig", "DrDoraAdapter"]

RANK_FIELD = "dr_rank"
INIT_RATIO, BETA = 1.5, 0.9  # r0 = ceil(1.5 r); the importance EMA factor (the paper's settings)


@register_config
@dataclass(frozen=True, kw_only=True)
class DrDoraConfig(LoraConfig):
    """LoRA fields (r = the target average rank; r0 = ceil(1.5 r) at the start) plus the pruning schedule
    (peft_type "DR_DORA", not in peft). total_step: T, the optimizer steps of the run; None = no pruning (gated LoRA
    with the regularizer). dr_prune_start / dr_prune_end: pruning starts after start * T steps and stops end * T
    steps before the end (0.15, 0.5). dr_prune_interval: steps between pruning events (100). dr_reg_weight: lambda
    of the regularizer (0.1). dr_rank_pattern: {exact module path regex: components kept}, written at save.
    """

    peft_type: ClassVar[str] = "DR_DORA"
    method_name: ClassVar[str] = "dr_dora"

    lora_dropout: float = 0.1
    total_step: int | None = None
    dr_prune_start: float = 0.15
    dr_prune_end: float = 0.5
    dr_prune_interval: int = 100
    dr_reg_weight: float = 0.1
    dr_rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        for name, default in (("use_dora", False), ("lora_bias", False), ("use_rslora", False),
                              ("init_lora_weights", True)):  # own init (A, B kaiming, c = 0), scale alpha / r0
            if getattr(self, name) is not default:
                raise ConfigError(name, f"dr_dora needs {name}={default} (own init and scale, no bias)")
        _check("dr_prune_start", self.dr_prune_start, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _check("dr_prune_end", self.dr_prune_end, lambda v: 0 <= v < 1 - self.dr_prune_start,
               "a number in [0, 1 - dr_prune_start)")
        _check("dr_reg_weight", self.dr_reg_weight, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        _check("dr_prune_interval", self.dr_prune_interval, lambda v: v >= 1, "an integer >= 1", int)
        if self.total_step is not None:
            _check("total_step", self.total_step, lambda v: v >= 1, "None or an integer >= 1", int)

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> DrDoraConfig:
        bad = sorted({key for fields in per_layer.values() for key in fields} - {RANK_FIELD})
        if bad:
            raise ConfigError(bad[0], f"DrDoraConfig records only {RANK_FIELD} per layer")
        new = {re.escape(path): fields[RANK_FIELD] for path, fields in per_layer.items()}
        return self.replace(dr_rank_pattern=self.dr_rank_pattern | new)


def _check(name: str, v: Any, ok: Callable[[Any], bool], text: str, kind: type | tuple = (int, float)) -> None:
    if isinstance(v, bool) or not isinstance(v, kind) or not ok(v):
        raise ConfigError(name, f"must be {text}, got {v!r}")


@register_adapter("dr_dora", DrDoraConfig)
class DrDoraAdapter(Adapter):
    """DynamicRank-DoRA (arXiv 2405.17357): y = W x + b + (alpha / r0) B (g * A drop(x)), g = c * mask (k,).

    A (k, in...), B (out, k...): kaiming-uniform (a = 0, as the reference code); c = 0: identity at init. Importance
    s_i = ||g_i b_i a_i^T||_F / (||B diag(g) A||_F + 1e-8), EMA 0.9; pruning, regularizer and shrinking: `_advance`.
    Regularizer: lambda [sum_i Var(a_i) + sum_i Var(b_i)] / (2 r0 L), L layers. Merge: W' = W + (alpha/r0) B diag(g) A.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})
    train_scalars = ("pruning_done",)  # a resume after the pruning window keeps the regularizer off

    def __init__(self, ops: LayerOps, config: DrDoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None else ""
        self.r0 = math.ceil(INIT_RATIO * config.r)
        self.scaling = config.lora_alpha / self.r0  # fixed through pruning
        k = pattern_value(config.dr_rank_pattern, path, self.r0) if path else self.r0
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.lora_A = self.new_param(ops.a_shape(k), dtype, device)  # (k, in...)
        self.lora_B = self.new_param(ops.b_shape(k), dtype, device)  # (out, k...)
        self.lora_c = self.new_param((k,), dtype, device)  # (k,) gates
        self.register_buffer("lora_c_mask", torch.ones(k, dtype=dtype, device=device))  # (k,) 1 live, 0 pruned
        self.register_buffer("dr_score", torch.zeros(k, dtype=torch.float32, device=device), persistent=False)
        p = config.lora_dropout if ops.kind != "embedding" else 0  # no dropout on token ids
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.group = LayerGroup.of(ctx.shared if ctx is not None else None, "dr_dora")  # the injection's layers
        self.group.add(path, self)
        self.pruning_done = k < self.r0
        if initialize:
            nn.init.kaiming_uniform_(self.lora_A)
            nn.init.kaiming_uniform_(self.lora_B)

    def gated_B(self) -> Tensor:
        g = (self.lora_c * self.lora_c_mask).reshape(1, -1, *([1] * (self.lora_B.dim() - 2)))  # (1, k, 1...)
        return self.lora_B * g  # (out, k...): B diag(c * mask)

    def _hidden(self, x: Tensor) -> Tensor:
        return self.ops.down(self.cast_input(self.dropout(x), self.lora_A), self.lora_A) * self.scaling  # (..., k)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self._hidden(x), self.gated_B())  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up_add_(y, self._hidden(x), self.gated_B())

    def delta_weight(self) -> Tensor:  # (out, in_flat); explicit shapes: k may be 0 after pruning
        k, n_out, n_in = self.lora_c.shape[0], self.ops.out_features, self.ops.in_features
        return self.scaling * (self.gated_B().reshape(n_out, k).float() @ self.lora_A.reshape(k, n_in).float())

    def lowered(self) -> LowRank:
        return LowRank(self.lora_A, self.gated_B().detach(), self.scaling)

    def disk_names(self) -> dict[str, str]:
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_c": "lora_c", "lora_c_mask": "lora_c_mask"}

    def layer_fields(self) -> dict[str, Any] | None:
        return {RANK_FIELD: self.lora_c.shape[0]} if self.lora_c.shape[0] != self.r0 else None

    @torch.no_grad()
    def contribution(self) -> Tensor:  # s_i = ||g_i b_i a_i^T||_F / (||B diag(g) A||_F + eps), (k,), no B A formed
        a, b = self.ops.flat(self.lora_A).float(), self.ops.flat(self.lora_B).float()  # (k, in_flat), (out, k)
        g = (self.lora_c * self.lora_c_mask).float()  # (k,)
        parts = g.abs() * a.norm(dim=1) * b.norm(dim=0)  # (k,)
        total = ((b.T @ b) * (a @ a.T) * torch.outer(g, g)).sum().clamp_min(0).sqrt()  # ||B diag(g) A||_F
        return parts / (total + 1e-8)

    def extra_losses(self) -> dict[str, Tensor]:
        if self.pruning_done or self.config.dr_reg_weight == 0:
            return {}
        a, b = self.ops.flat(self.lora_A), self.ops.flat(self.lora_B)  # (k, in_flat), (out, k)
        var = a.var(dim=1).sum() + b.var(dim=0).sum()  # rows of A, columns of B (unbiased, as the reference)
        return {"dr_dora_equilibrium": self.config.dr_reg_weight * var / (2 * self.r0 * len(self.group))}

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        self.lora_c.detach().mul_(self.lora_c_mask)  # pruned gates stay 0
        if self.group.first_at(step):  # the first layer of the injection works for all (global threshold)
            _advance(self.group, self.config, step)
        return None


@torch.no_grad()
def _advance(group: LayerGroup, cfg: DrDoraConfig, step: int) -> None:
    """Every step until t > t_max: importance EMA. At t = 0, interval, ..., t_max: int((sum r0 - sum r) (t/t_max)^3)
    components of all layers are pruned (one global threshold, for good). After t_max: pruned ones are dropped (k
    shrinks, saves record k) and the regularizer is off."""
    layers = [a for _, a in group.layers]
    if cfg.total_step is None:
        return
    t = int(step - cfg.total_step * cfg.dr_prune_start)  # pruning step, runs 0..t_max
    t_max = int(cfg.total_step * (1 - cfg.dr_prune_start - cfg.dr_prune_end))
    if t > t_max:
        for a in layers:
            _compact(a)
        return
    for a in layers:
        a.dr_score.mul_(BETA).add_(a.contribution(), alpha=1 - BETA)
    if t < 0 or (t % cfg.dr_prune_interval and t != t_max):
        return
    frac = 1.0 if t_max <= 0 else (t / t_max) ** 3
    n_prune = int(sum(a.r0 - a.config.r for a in layers) * frac)
    scores = [a.dr_score.masked_fill(a.lora_c_mask == 0, -math.inf) for a in layers]  # pruned ones go first
    for a, keep in zip(layers, prune_mask(scores, n_prune), strict=True):
        a.lora_c_mask.mul_(keep.to(a.lora_c_mask.dtype))
        a.lora_c.mul_(a.lora_c_mask)


@torch.no_grad()
def _compact(a: DrDoraAdapter) -> None:
    """After pruning: A, B and c shrink to the live components (new parameters; step_hook re-syncs the optimizer)."""
    a.pruning_done = True
    live = a.lora_c_mask.nonzero().flatten()  # (k',)
    if live.numel() == a.lora_c_mask.numel():
        return
    a.lora_A = nn.Parameter(a.lora_A.index_select(0, live).contiguous())  # (k', in...)
    a.lora_B = nn.Parameter(a.lora_B.index_select(1, live).contiguous())  # (out, k'...)
    a.lora_c = nn.Parameter(a.lora_c.index_select(0, live).contiguous())  # (k',)
    a.lora_c_mask = a.lora_c_mask.index_select(0, live)
    a.dr_score = a.dr_score.index_select(0, live)
