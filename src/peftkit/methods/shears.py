"""Shears: a Wanda-pruned (unstructured sparse) base plus an elastic-rank LoRA super-adapter (neural low-rank search).
Munoz et al., arXiv 2404.10934 (IntelLabs/Hardware-Aware-Automated-Machine-Learning); Wanda: arXiv 2306.11695."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .common import check_number, pattern_value
from .lora import LoraAdapter, LoraConfig

__all__ = ["ShearsConfig", "ShearsAdapter", "wanda_mask"]

PLAIN_INITS = (True, False, "gaussian")
EVAL_FIELD = "shears_eval_rank"


@torch.no_grad()
def wanda_mask(w2d: Tensor, input_cov: Tensor, sparsity: float) -> Tensor:
    """Keep-mask (out, in) bool: in every output row, drop the int(sparsity * in) lowest S_ij = |W_ij| ||X_j||.

    input_cov is X^T X / N (in, in); its diagonal is ||X_j||^2 / N, a per-layer constant factor away from ||X_j||^2.
    """
    norms = input_cov.diagonal().float().clamp_min(0).sqrt()  # (in,)
    score = w2d.detach().float().abs() * norms  # (out, in)
    mask = torch.ones(score.shape, dtype=torch.bool, device=w2d.device)  # (out, in)
    k = int(score.shape[1] * sparsity)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices.to(w2d.device), False)
    return mask


@register_config
@dataclass(frozen=True, kw_only=True)
class ShearsConfig(LoraConfig):
    """LoRA fields (r = r_max, s = lora_alpha / r_max for every sub-rank) plus the sparsity and the rank search space
    (peft_type "SHEARS"; peft has no such method).

    shears_sparsity: sigma in [0, 1), the fraction of each base weight row Wanda prunes (needs calibration data).
    shears_rank_choices: the elastic ranks sampled uniformly in training (each <= r); None = (r, ceil(3r/4),
      ceil(r/2)), e.g. (32, 24, 16) for r = 32. shears_eval_rank: the rank used in eval mode, merges and saves;
      None = the heuristic sub-adapter, the median choice (the lower one of two middles).
    shears_rank_pattern: per-module eval ranks {exact module path regex: rank} (a search result; recorded at save).
    """

    peft_type: ClassVar[str] = "SHEARS"
    method_name: ClassVar[str] = "shears"

    shears_sparsity: float = 0.5
    shears_rank_choices: tuple[int, ...] | None = None
    shears_eval_rank: int | None = None
    shears_rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(name, "is not supported by Shears; set it to False")
        if self.init_lora_weights not in PLAIN_INITS or not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError("init_lora_weights", f"Shears prunes the base itself; use one of {PLAIN_INITS}, "
                                                   f"got {self.init_lora_weights!r}")
        check_number("shears_sparsity", self.shears_sparsity, 0, 1)
        choices = self.shears_rank_choices
        if choices is not None:
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError("shears_rank_choices", f"must be a non-empty list of ranks, got {choices!r}")
            self._set("shears_rank_choices", tuple(choices))
            for k in choices:
                self.check_rank("shears_rank_choices", k)
        if self.shears_eval_rank is not None:
            self.check_rank(EVAL_FIELD, self.shears_eval_rank)
        for key, k in self.shears_rank_pattern.items():
            self.check_rank(f"shears_rank_pattern[{key!r}]", k)

    def check_rank(self, name: str, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.r:
            raise ConfigError(name, f"ranks must be integers in [1, r={self.r}] (nested slices of the super-adapter), "
                                    f"got {k!r}")

    @property
    def rank_choices(self) -> tuple[int, ...]:
        """The search space, largest first."""
        default = (self.r, math.ceil(3 * self.r / 4), math.ceil(self.r / 2))
        return tuple(sorted(set(self.shears_rank_choices or default), reverse=True))

    @property
    def eval_rank(self) -> int:
        if self.shears_eval_rank is not None:
            return self.shears_eval_rank
        ranks = sorted(self.rank_choices)
        return ranks[(len(ranks) - 1) // 2]

    def for_module(self, name: str) -> ShearsConfig:
        base = super().for_module(name)
        k = pattern_value(self.shears_rank_pattern, name, None)
        return base if k is None or k == base.shears_eval_rank else base.replace(shears_eval_rank=k)

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> ShearsConfig:
        bad = sorted({key for fields in per_layer.values() for key in fields} - {EVAL_FIELD})
        if bad:
            raise ConfigError(bad[0], f"ShearsConfig records only {EVAL_FIELD} per layer")
        new = {re.escape(path): fields[EVAL_FIELD] for path, fields in per_layer.items()}
        return self.replace(shears_rank_pattern=self.shears_rank_pattern | new)

    def for_original_base(self) -> ShearsConfig:
        return self  # the checkpoint holds the mask; loading prunes the original base again


@register_adapter("shears", ShearsConfig)
class ShearsAdapter(LoraAdapter):
    """Shears (arXiv 2404.10934): y = (M * W) x + b + s * B[:, :r'] A[:r', :] drop(x), s = lora_alpha / r_max.

    M: the Wanda keep-mask (out, in) from calibration ("input_cov"), a persistent bool buffer. The pruned part
    W * (1 - M) is init_delta: the host takes it out of the base when the adapter joins and puts it back on delete,
    and after_load takes it again from the original base. r': in training a rank drawn uniformly from the choices
    after every optimizer step (on_step; step 1 trains r_max); in eval mode the chosen eval rank (`set_eval_rank`).
    Merge (dense, exact, at the eval rank): W' = M * W + s B[:, :r'] A[:r', :]; `sparse_delta_weight` gives the
    sparsity-preserving M * (s B A), an approximation. Not identity at init (the base is pruned).
    Training checkpoints keep r' (train_scalars), the rank drawn for the step after the checkpoint.
    """

    capabilities = frozenset({"mergeable"})
    calibration = frozenset({"input_cov"})
    train_scalars = ("train_rank",)

    def __init__(self, ops: LayerOps, config: ShearsConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"shears prunes Linear and Conv1D layers with input statistics, not {ops.kind}")
        super().__init__(ops, config, initialize, ctx)
        mask = torch.ones(ops.out_features, ops.in_features, dtype=torch.bool, device=ops.weight.device)
        self.register_buffer("shears_mask", mask)  # (out, in)
        self.choices, self.eval_rank, self.train_rank = config.rank_choices, config.eval_rank, config.r

    @property
    def rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def set_eval_rank(self, k: int) -> None:
        """Pick this module's sub-adapter (a search result); it is saved with the adapter."""
        self.config.check_rank(EVAL_FIELD, k)
        self.eval_rank = k

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        self.shears_mask.copy_(wanda_mask(self.ops.weight2d(), stats["input_cov"], self.config.shears_sparsity))
        self._take_pruned()

    def after_load(self) -> None:
        self._take_pruned()  # the file holds M; the base it loads onto is the original one

    def _take_pruned(self) -> None:
        pruned = self.ops.weight2d().detach().float() * ~self.shears_mask  # (out, in): W * (1 - M)
        self.init_delta = pruned if bool(pruned.any()) else None

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        self.train_rank = self.choices[int(torch.randint(len(self.choices), ()))]  # the next step's sub-adapter

    def _hidden(self, x: Tensor) -> Tensor:
        a = self.lora_A[:self.rank]  # (r', in): the nested sub-adapter's first r' rows
        return self.ops.down(self.cast_input(self.dropout(x), a), a) * self.scaling  # (..., r')

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self._hidden(x), self.lora_B[:, :self.rank])  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up_add_(y, self._hidden(x), self.lora_B[:, :self.rank])

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B[:, :self.eval_rank].float() @ self.lora_A[:self.eval_rank].float())

    def sparse_delta_weight(self) -> Tensor:
        """M * (s B A): a merge that keeps the base sparse (approximate: the forward has the dense s B A)."""
        return self.delta_weight() * self.shears_mask

    def lowered(self) -> None:
        return None  # the pruning is part of the adapter: no low-rank form against the original base

    def state_for_original_base(self) -> None:
        return None

    def layer_fields(self) -> dict[str, Any] | None:
        return {EVAL_FIELD: self.eval_rank} if self.eval_rank != self.config.eval_rank else None

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"shears_mask": "shears_mask"}
