"""IncreLoRA (Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", arXiv 2308.12043; reference code FeiyuZhang98/IncreLoRA `loralib/increlora.py`): SVD-form LoRA that
starts small and adds rank-1 components to the most important modules until a global rank budget is reached."""

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
from ..errors import UnsupportedLayerError
from . import rank_budget as rb
from .common import adapter_dtype, check_alpha, check_rank, flagged, split_chunks, split_field

__all__ = ["IncreLoraConfig", "IncreLoraAdapter"]

RESERVE_E = 1e-5  # the frozen singular value of a reserve component ("advance learning")


@register_config
@dataclass(frozen=True, kw_only=True)
class IncreLoraConfig(AdapterConfig):
    """r: starting rank per module; target_rank: average final rank (budget = target_rank * #modules).
    init_warmup / incre_interval: grow every incre_interval steps once past init_warmup; top_h modules grow per
    round, by incre_rank_num each. advance_learn: keep a trained reserve component per module. beta1 / beta2: EMA
    rates of the module importance. orth_reg_weight: orthogonality loss weight. lora_alpha: s = alpha / (rank +
    1e-5). rank_pattern: current ranks {exact module path: r}; chunk_pattern: {path: [sizes]} of the chunks growth
    made (E chunk sizes; A/B's first chunk adds the reserve rows); both recorded at save after growth.
    """

    peft_type: ClassVar[str] = "INCRELORA"
    method_name: ClassVar[str] = "increlora"

    r: int = 1
    target_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    init_warmup: int = 1000
    incre_interval: int = 1000
    top_h: int = 2
    incre_rank_num: int = 1
    advance_learn: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    rank_pattern: dict[str, int] = field(default_factory=dict)
    chunk_pattern: dict[str, list[int]] = field(default_factory=dict)

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        rb.check_int("target_rank", self.target_rank, self.r)
        for name, low in (("init_warmup", 0), ("incre_interval", 1), ("top_h", 1), ("incre_rank_num", 1)):
            rb.check_int(name, getattr(self, name), low)
        rb.check_beta("beta1", self.beta1)
        rb.check_beta("beta2", self.beta2)
        rb.check_number("orth_reg_weight", self.orth_reg_weight)
        rb.check_number("lora_dropout", self.lora_dropout, 0, 1)
        for key, value in self.rank_pattern.items():
            check_rank(f"rank_pattern[{key!r}]", value)
        for key, sizes in self.chunk_pattern.items():
            for value in sizes:
                check_rank(f"chunk_pattern[{key!r}]", value)

    def rank_of(self, path: str) -> int:
        return self.rank_pattern.get(path, self.r)

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> IncreLoraConfig:
        per_layer, chunks = split_field(per_layer, "chunks")
        return self.replace(rank_pattern=rb.recorded_ranks(self.rank_pattern, per_layer),
                            chunk_pattern={**self.chunk_pattern, **chunks})


@register_adapter("increlora", IncreLoraConfig)
class IncreLoraAdapter(Adapter):
    """IncreLoRA (arXiv 2308.12043): y = W x + b + s * B (E * A drop(x)), s = alpha / (rank + 1e-5).

    A: (R, in), B: (out, R) with R = rank + n_res: the active rows, then n_res = incre_rank_num reserve rows whose
    singular values are a frozen buffer at 1e-5 (advance learning: their a, b train early). E: (rank, 1) trainable,
    0 at init; A, B ~ N(0, 0.02^2). While the budget is open the product dW = s B diag(E) A is materialized in
    training and a gradient hook scores the module sum|dW * dL/dW| / sqrt(numel), smoothed by sensitivity x
    uncertainty EMAs. Every incre_interval steps after init_warmup the top_h modules grow: their reserve's e becomes
    a trainable parameter, new reserve rows are appended (new parameters join the optimizer through the core), and
    rank (hence s) increases. At the budget the reserve values are set to 0. Merge: W' = W + s B diag(E) A.
    """

    capabilities = frozenset({"mergeable", "servable"})  # the reserve adds 1e-5-sized terms at init

    def __init__(self, ops: LayerOps, config: IncreLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind == "conv":
            raise UnsupportedLayerError("increlora supports Linear, Conv1D and Embedding layers, not convolutions")
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None else ""
        self.rank = config.rank_of(path)
        self.chunks = config.chunk_pattern.get(path, [self.rank])  # the layout after_load splits into
        self.n_res = config.incre_rank_num if config.advance_learn else 0
        rows, dtype, device = self.rank + self.n_res, adapter_dtype(ops), ops.weight.device
        self.lora_A = nn.ParameterList([self.new_param((rows, ops.in_features), dtype, device)])  # chunks (k, in)
        self.lora_E = nn.ParameterList([self.new_param((self.rank, 1), dtype, device)])  # chunks (k, 1)
        self.lora_B = nn.ParameterList([self.new_param((ops.out_features, rows), dtype, device)])  # chunks (out, k)
        self.register_buffer("reserve_E", torch.full((self.n_res, 1), RESERVE_E, dtype=dtype, device=device))
        use_dropout = config.lora_dropout > 0 and ops.kind != "embedding"
        self.dropout = nn.Dropout(config.lora_dropout) if use_dropout else nn.Identity()
        self.importance = rb.EmaImportance(config.beta1, config.beta2)
        self.score: Tensor | None = None  # sum|dW * dL/dW| / sqrt(numel) of the backward passes since the last step
        self.group = rb.LayerGroup.of(ctx.shared if ctx is not None else None, "rank_allocator")
        self.group.add(path, self)
        if initialize:
            with torch.no_grad():
                self.lora_A[0].normal_(0.0, 0.02)
                self.lora_B[0].normal_(0.0, 0.02)

    all_A = property(lambda self: rb.cat_chunks(self.lora_A, 0))  # (R, in)
    all_E = property(lambda self: rb.cat_chunks(self.lora_E, 0))  # (rank, 1)
    all_B = property(lambda self: rb.cat_chunks(self.lora_B, 1))  # (out, R)

    @property
    def scaling(self) -> float:
        return self.config.lora_alpha / (self.rank + 1e-5)

    def e_full(self) -> Tensor:
        """Singular values of every row, the frozen reserve last: (R, 1)."""
        e = self.all_E
        return torch.cat([e, self.reserve_E.to(e.dtype)]) if self.n_res else e

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        a, b, e = self.all_A, self.all_B, self.e_full()
        x = self.cast_input(self.dropout(x), a)
        if self.training and torch.is_grad_enabled() and self.group.state.get("growing", True):
            delta = self.scaling * (b @ (a * e))  # (out, in): the product the importance hook watches
            if delta.requires_grad:
                seen = delta.detach()
                delta.register_hook(lambda g: self._record(seen, g))
            return self.ops.down(x, delta)  # (..., out): dW applied as a factor with out rows
        return self.ops.up(self.ops.down(x, a) * (e.view(-1) * self.scaling), b)  # (..., out)

    def _record(self, delta: Tensor, grad: Tensor) -> None:
        s = (delta.abs() * grad).abs().sum() / math.sqrt(delta.numel())
        self.score = s if self.score is None else self.score + s

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.all_B.float() @ (self.all_A.float() * self.e_full().float()))  # (out, in)

    def lowered(self) -> LowRank:
        return LowRank((self.all_A * self.e_full()).detach(), self.all_B.detach(), self.scaling)

    def extra_losses(self) -> dict[str, Tensor]:
        w = self.config.orth_reg_weight / (2 * max(len(self.group), 1))  # mean over the 2 L factors
        return {"orth_reg": w * rb.orthogonality(self.all_A, self.all_B)} if w else {}

    # --- growth ------------------------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        if self.group.first_at(step):
            grow_step([layer for _, layer in self.group.layers], self.config, step, self.group.state)

    def update_importance(self) -> None:
        if self.score is not None:
            self.importance.update("module", self.score)
            self.score = None

    def importance_score(self) -> float:
        return float(self.importance.score("module")) if self.importance.has("module") else 0.0

    @torch.no_grad()
    def grow(self, k: int) -> None:
        """rank += k: the first k reserve values become trainable (or k fresh e = 0 without a reserve) and k new
        rows a ~ N(0, 0.02^2) (in), b ~ N(0, 0.02^2) (out) are appended."""
        a0 = self.lora_A[0]
        e = self.reserve_E[:k].clone() if self.n_res else a0.new_zeros(k, 1)  # (k, 1)
        self.lora_E.append(nn.Parameter(e.to(a0.dtype)))
        self.lora_A.append(nn.Parameter(a0.new_empty(k, a0.shape[1]).normal_(0.0, 0.02)))  # (k, in)
        self.lora_B.append(nn.Parameter(a0.new_empty(self.lora_B[0].shape[0], k).normal_(0.0, 0.02)))  # (out, k)
        self.rank += k

    # --- checkpoints -------------------------------------------------------------------------------------------
    def disk_names(self) -> dict[str, str]:
        return {"all_A": "lora_A", "all_E": "lora_E", "all_B": "lora_B", "reserve_E": "lora_reserve_E"}

    def layer_fields(self) -> dict[str, Any] | None:
        return {"r": self.rank, "chunks": [len(e) for e in self.lora_E]} if len(self.lora_E) > 1 else None

    @torch.no_grad()
    def after_load(self) -> None:  # saved after growth: the chunks of the training run, so that it can resume
        if len(self.chunks) > 1 and len(self.lora_E) == 1:
            rows = [self.chunks[0] + self.n_res, *self.chunks[1:]]
            self.lora_E = split_chunks(self.lora_E[0], self.chunks, 0)
            self.lora_A, self.lora_B = split_chunks(self.lora_A[0], rows, 0), split_chunks(self.lora_B[0], rows, 1)

    def train_state(self) -> dict[str, Tensor]:  # the importance EMAs, the pending score, the group's phase
        like = {"module": self.lora_A[0].new_zeros(())}
        score, has_score = flagged(self.score, like["module"])
        flags = torch.tensor([has_score, self.group.state.get("growing", True)])
        return super().train_state() | self.importance.state(like) | {"score": score, "flags": flags}

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        rest = self.importance.load_state(state, {"module": self.lora_A[0].new_zeros(())})
        (has_score, growing), score = rest.pop("flags").tolist(), rest.pop("score")
        self.score, self.group.state["growing"] = score.to(self.lora_A[0].device) if has_score else None, bool(growing)
        super().load_train_state(rest)


@torch.no_grad()
def grow_step(layers: list[IncreLoraAdapter], cfg: IncreLoraConfig, step: int, state: dict[str, Any]) -> None:
    """The reference RankAllocator.update_and_increase over one adapter's layers, capped at the budget."""
    left = cfg.target_rank * len(layers) - sum(layer.rank for layer in layers)
    if left > 0:
        for layer in layers:
            layer.update_importance()
        if step > cfg.init_warmup and step % cfg.incre_interval == 0:
            scores = [layer.importance_score() for layer in layers]
            for i in rb.top_k(scores, min(cfg.top_h, math.ceil(left / cfg.incre_rank_num))):
                k = min(cfg.incre_rank_num, left)
                layers[i].grow(k)
                left -= k
    if left <= 0 and state.get("growing", True):
        state["growing"] = False  # budget reached: no more scoring, the reserve stops contributing
        for layer in layers:
            layer.reserve_E.zero_()
            layer.score = None
