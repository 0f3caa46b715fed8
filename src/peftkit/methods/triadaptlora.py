"""TriAdaptLoRA (arXiv 2501.08008): LoRA with a triangular-split r x r core, normalized-Frobenius module importance
and threshold-driven rank growth. RECONSTRUCTED: no code and no full text were available; this follows the
placeholder of spec 1.34 (B (L + U) A, linear threshold schedule) and must be re-checked against the paper."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from . import rank_budget as rb
from .common import adapter_dtype, check_alpha, check_rank

__all__ = ["TriAdaptLoraConfig", "TriAdaptLoraAdapter", "tri_matrix"]


@register_config
@dataclass(frozen=True, kw_only=True)
class TriAdaptLoraConfig(AdapterConfig):
    """r: starting rank per module; target_rank: average final rank (budget = target_rank * #modules).
    lora_alpha: s = lora_alpha / r (the starting r, so growth never rescales). deltaT: steps between growth checks
    in (tinit, total_step - tfinal]; the threshold rises linearly from tau_start to tau_end over that window.
    beta: EMA rate of the importance. rank_pattern: current ranks {exact module path: r}, recorded at save.
    """

    peft_type: ClassVar[str] = "TRIADAPTLORA"
    method_name: ClassVar[str] = "triadaptlora"

    r: int = 4
    target_rank: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    total_step: int = 1000
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 10
    tau_start: float = 1.0
    tau_end: float = 2.0
    beta: float = 0.85
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        rb.check_int("target_rank", self.target_rank, self.r)
        for name, low in (("total_step", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            rb.check_int(name, getattr(self, name), low)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError("tinit", f"tinit={self.tinit} leaves no growth window before total_step - tfinal = "
                                       f"{self.total_step - self.tfinal}; lower tinit/tfinal or raise total_step")
        rb.check_number("tau_start", self.tau_start)
        rb.check_number("tau_end", self.tau_end, self.tau_start)
        rb.check_beta("beta", self.beta)
        rb.check_number("lora_dropout", self.lora_dropout, 0, 1)
        for key, value in self.rank_pattern.items():
            check_rank(f"rank_pattern[{key!r}]", value)

    def rank_of(self, path: str) -> int:
        return self.rank_pattern.get(path, self.r)

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> TriAdaptLoraConfig:
        return self.replace(rank_pattern=rb.recorded_ranks(self.rank_pattern, per_layer))


def tri_matrix(lower: Tensor, upper: Tensor, r: int) -> Tensor:
    """T = L + U (r, r) from the packed lower triangle with diagonal, row by row (T[0,0], T[1,0], T[1,1], ...),
    and the packed strict upper triangle, column by column (T[0,1], T[0,2], T[1,2], ...): appending row and column r
    appends r + 1 values to `lower` and r values to `upper`."""
    li = torch.tril_indices(r, r, device=lower.device)  # (2, r(r+1)/2), row-major
    ui = torch.tril_indices(r, r, -1, device=lower.device).flip(0)  # (2, r(r-1)/2), column-major upper
    t = lower.new_zeros(r, r).index_put((li[0], li[1]), lower)  # (r, r)
    return t.index_put((ui[0], ui[1]), upper)


@register_adapter("triadaptlora", TriAdaptLoraConfig)
class TriAdaptLoraAdapter(Adapter):
    """TriAdaptLoRA (arXiv 2501.08008, reconstructed): y = W x + b + s * B T A drop(x), s = alpha / r_0.

    A: (r, in) kaiming-uniform, B: (out, r) = 0, T = L + U (r, r) = I at init, stored as its packed lower
    (r(r+1)/2) and strict upper (r(r-1)/2) triangles. Importance after each step: I = ||s B T A||_F / sqrt(numel),
    divided by its mean over the adapter's modules and EMA-smoothed (beta). Every deltaT steps in the growth window
    each module with I > tau(t) (linear tau_start -> tau_end), most important first, gains one rank until the
    budget target_rank * #modules is used: a new row a (kaiming), column b = 0, T row [0 ... 0 1] and column 0, so
    the output is unchanged. Merge: W' = W + s B T A, exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: TriAdaptLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind == "conv":
            raise UnsupportedLayerError("triadaptlora supports Linear, Conv1D and Embedding layers, not convolutions")
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None else ""
        self.rank = self.built_rank = r = config.rank_of(path)
        dtype, device = adapter_dtype(ops), ops.weight.device
        self.scaling = config.lora_alpha / config.r
        self.lora_A = nn.ParameterList([self.new_param((r, ops.in_features), dtype, device)])  # chunks (k, in)
        self.lora_B = nn.ParameterList([self.new_param((ops.out_features, r), dtype, device)])  # chunks (out, k)
        self.lora_T_lower = nn.ParameterList([self.new_param((r * (r + 1) // 2,), dtype, device)])  # packed rows
        self.lora_T_upper = nn.ParameterList([self.new_param((r * (r - 1) // 2,), dtype, device)])  # packed columns
        use_dropout = config.lora_dropout > 0 and ops.kind != "embedding"
        self.dropout = nn.Dropout(config.lora_dropout) if use_dropout else nn.Identity()
        self.ema: float | None = None
        self.group = rb.LayerGroup.of(ctx.shared if ctx is not None else None, "rank_allocator")
        self.group.add(path, self)
        if initialize:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A[0], a=math.sqrt(5))
                li = torch.tril_indices(r, r)
                self.lora_T_lower[0].copy_((li[0] == li[1]).to(dtype))  # T = I

    all_A = property(lambda self: rb.cat_chunks(self.lora_A, 0))  # (r, in)
    all_B = property(lambda self: rb.cat_chunks(self.lora_B, 1))  # (out, r)
    all_lower = property(lambda self: rb.cat_chunks(self.lora_T_lower, 0))  # (r(r+1)/2,)
    all_upper = property(lambda self: rb.cat_chunks(self.lora_T_upper, 0))  # (r(r-1)/2,)

    def core(self) -> Tensor:
        return tri_matrix(self.all_lower, self.all_upper, self.rank)  # (r, r)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        a = self.all_A
        h = self.ops.down(self.cast_input(self.dropout(x), a), a)  # (..., r)
        return self.ops.up((h @ self.core().T) * self.scaling, self.all_B)  # (..., out)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.all_B.float() @ self.core().float() @ self.all_A.float())  # (out, in)

    def lowered(self) -> LowRank:
        return LowRank((self.core() @ self.all_A).detach(), self.all_B.detach(), self.scaling)

    @torch.no_grad()
    def frobenius(self) -> float:
        """||s B T A||_F / sqrt(out * in) without forming B T A: tr(T^T (B^T B) T (A A^T))."""
        a, b, t = self.all_A.float(), self.all_B.float(), self.core().float()
        sq = ((t.T @ (b.T @ b) @ t) * (a @ a.T)).sum().clamp_min(0)
        return self.scaling * math.sqrt(float(sq)) / math.sqrt(a.shape[1] * b.shape[0])

    @torch.no_grad()
    def grow(self) -> None:
        """rank += 1, output unchanged: a ~ kaiming (in), b = 0 (out), T row r = [0 ... 0 1], T column r = 0."""
        a0, r = self.lora_A[0], self.rank
        a = a0.new_empty(1, a0.shape[1])
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))  # (1, in)
        self.lora_B.append(nn.Parameter(a0.new_zeros(self.lora_B[0].shape[0], 1)))  # (out, 1)
        row = a0.new_zeros(r + 1)
        row[r] = 1
        self.lora_T_lower.append(nn.Parameter(row))  # (r + 1,)
        self.lora_T_upper.append(nn.Parameter(a0.new_zeros(r)))  # (r,)
        self.rank += 1

    def on_step(self, step: int) -> None:
        if self.group.first_at(step):
            grow_step([layer for _, layer in self.group.layers], self.config, step)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def disk_names(self) -> dict[str, str]:
        return {"all_A": "lora_A", "all_B": "lora_B", "all_lower": "lora_T_lower", "all_upper": "lora_T_upper"}

    def layer_fields(self) -> dict[str, Any] | None:
        return {"r": self.rank} if self.rank != self.built_rank else None


@torch.no_grad()
def grow_step(layers: list[TriAdaptLoraAdapter], cfg: TriAdaptLoraConfig, step: int) -> None:
    """Update the normalized importance EMAs; every deltaT steps in the window grow the modules above tau(t)."""
    left = cfg.target_rank * len(layers) - sum(layer.rank for layer in layers)
    if left <= 0:
        return
    raw = [layer.frobenius() for layer in layers]
    mean = sum(raw) / len(raw)
    for layer, value in zip(layers, raw, strict=True):
        norm = value / mean if mean > 0 else 0.0
        layer.ema = norm if layer.ema is None else cfg.beta * layer.ema + (1 - cfg.beta) * norm
    if not (cfg.tinit < step <= cfg.total_step - cfg.tfinal and step % cfg.deltaT == 0):
        return
    tau = rb.linear_schedule(step, cfg.tau_start, cfg.tau_end, cfg.tinit, cfg.tfinal, cfg.total_step)
    above = [i for i, layer in enumerate(layers) if layer.ema > tau]
    for i in sorted(above, key=lambda i: -layers[i].ema)[:left]:
        layers[i].grow()
