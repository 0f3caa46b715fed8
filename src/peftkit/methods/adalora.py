"""AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv 2303.10512):
SVD-form LoRA whose singular triplets are pruned to a global, cubically shrinking rank budget. Matches peft's
`tuners/adalora` (AdaLoraConfig, SVDLinear, RankAllocator, `update_and_allocate`) step for step."""

from __future__ import annotations

from dataclasses import dataclass
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

__all__ = ["AdaLoraConfig", "AdaLoraAdapter"]


@register_config
@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """peft's AdaLoraConfig fields. init_r: rank r0 of every module at the start; target_r: average final rank
    (b_T = target_r * #modules). tinit / tfinal: steps without pruning at the start / end; total_step: T (required).
    deltaT: steps between allocations. beta1 / beta2: EMA rates. orth_reg_weight: orthogonality loss weight.
    rank_pattern: kept triplets {"<module path>.lora_E": [bool] * init_r}, recorded at save after pruning.
    r: peft's LoraConfig field, unused. lora_alpha: s = lora_alpha / (r0 + 1e-5)."""

    peft_type: ClassVar[str] = "ADALORA"
    method_name: ClassVar[str] = "adalora"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False

    def validate(self) -> None:
        check_rank("r", self.r)
        check_rank("init_r", self.init_r)
        check_alpha("lora_alpha", self.lora_alpha)
        rb.check_int("target_r", self.target_r, 0, self.init_r)
        if not isinstance(self.total_step, int) or isinstance(self.total_step, bool) or self.total_step <= 0:
            raise ConfigError("total_step", "AdaLoRA's budget schedule needs the number of training steps; pass "
                                            f"total_step=<int > 0>, got {self.total_step!r}")
        for name, low in (("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            rb.check_int(name, getattr(self, name), low)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError("tinit", f"tinit={self.tinit} leaves no pruning phase before total_step - tfinal = "
                                       f"{self.total_step - self.tfinal}; lower tinit/tfinal or raise total_step")
        rb.check_beta("beta1", self.beta1)
        rb.check_beta("beta2", self.beta2)
        rb.check_number("orth_reg_weight", self.orth_reg_weight)
        rb.check_number("lora_dropout", self.lora_dropout, 0, 1)
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, (list, tuple)) or len(mask) != self.init_r:
                raise ConfigError(f"rank_pattern[{key!r}]", f"must list init_r={self.init_r} booleans (kept triplets)")

    def module_mask(self, path: str) -> list[bool] | None:
        """The kept-triplet mask recorded for the module at `path` (peft's key "<path>.lora_E"), or None."""
        mask = (self.rank_pattern or {}).get(f"{path}.lora_E")
        return None if mask is None else [bool(m) for m in mask]

    def with_layer_fields(self, per_layer: dict[str, dict[str, Any]]) -> AdaLoraConfig:
        pattern = dict(self.rank_pattern or {})
        for path, fields in per_layer.items():
            if set(fields) != {"rank_pattern"}:
                raise ConfigError(sorted(fields)[0], "AdaLoraConfig records only per-layer rank_pattern masks")
            pattern[f"{path}.lora_E"] = list(fields["rank_pattern"])
        return self.replace(rank_pattern=pattern)


@register_adapter("adalora", AdaLoraConfig)
class AdaLoraAdapter(Adapter):
    """AdaLoRA (arXiv 2303.10512): y = W x + b + s * B (E * A drop(x)), s = alpha / (r0 + 1e-5), r0 = init_r fixed.

    A: (r, in), E: (r, 1), B: (out, r); init E = 0, A, B ~ N(0, 0.02^2). After each optimizer step (on_step, grads
    present) every entry's s = |w * g| feeds EMAs I, U; triplet i scores S_i = I U(E_i) + mean_j I U(A_ij) +
    mean_j I U(B_ji). Every deltaT steps past tinit, E_i := 0 for triplets with S_i <= the global threshold that
    keeps b(t) (cubic) over all modules; at T - tfinal the final mask is fixed and re-applied every later step.
    Saving keeps only the unmasked triplets (peft's format: tensors resized, rank_pattern in the config).
    Extra loss: orth_reg_weight * mean over factors of ||A A^T - I||_F, ||B^T B - I||_F. Merge: W' = W + s B diag(E) A.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: AdaLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind not in ("linear", "conv1d_transposed"):
            raise UnsupportedLayerError(f"adalora supports Linear and Conv1D layers (as peft), not {ops.kind}")
        super().__init__(ops, config, initialize, ctx)
        path = ctx.path if ctx is not None else ""
        mask = config.module_mask(path)
        self.rows = mask if mask is not None else [True] * config.init_r  # which of the r0 triplets are held
        r, dtype, device = sum(self.rows), adapter_dtype(ops), ops.weight.device
        self.n_units = r  # held triplets (the allocator's unit count)
        self.scaling = config.lora_alpha / (config.init_r + 1e-5)  # peft: alpha / (ranknum + 1e-5), ranknum = r0
        self.lora_A = self.new_param((r, ops.in_features), dtype, device)  # (r, in)
        self.lora_E = self.new_param((r, 1), dtype, device)  # (r, 1)
        self.lora_B = self.new_param((ops.out_features, r), dtype, device)  # (out, r)
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool, device=device), persistent=False)  # (r,)
        self.register_buffer("recorded", torch.tensor(mask is not None, device=device), persistent=False)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.importance = rb.EmaImportance(config.beta1, config.beta2)
        self.group = rb.LayerGroup.of(ctx.shared if ctx is not None else None, "rank_allocator")
        self.group.add(path, self)
        if initialize:
            self._initialize(config.init_lora_weights)

    @torch.no_grad()
    def _initialize(self, gaussian: bool) -> None:
        """E = 0, A, B ~ N(0, 0.02^2); init_lora_weights=False: all three ~ N(0, 1) (peft's torch.randn)."""
        for p in (self.lora_A, self.lora_B) if gaussian else (self.lora_A, self.lora_E, self.lora_B):
            p.normal_(0.0, 0.02 if gaussian else 1.0)

    def _h(self, x: Tensor) -> Tensor:  # s * E * (A drop(x)): (..., r)
        xa = self.ops.down(self.cast_input(self.dropout(x), self.lora_A), self.lora_A)  # (..., r)
        return xa * (self.lora_E.view(-1) * self.scaling)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self._h(x), self.lora_B)  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up_add_(y, self._h(x), self.lora_B)  # y += s B (E * A x)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()))  # (out, in)

    def lowered(self) -> LowRank:
        return LowRank((self.lora_A * self.lora_E).detach(), self.lora_B.detach(), self.scaling)

    def extra_losses(self) -> dict[str, Tensor]:
        w = self.config.orth_reg_weight / (2 * max(len(self.group), 1))  # peft: mean over the 2 L factors
        return {"orth_reg": w * rb.orthogonality(self.lora_A, self.lora_B)} if w else {}

    # --- rank allocation ---------------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        if self.group.first_at(step):
            c = self.config
            rb.cubic_allocation([layer for _, layer in self.group.layers], step, c.target_r * len(self.group), c.tinit,
                                c.tfinal, c.total_step, c.deltaT, self.group.state)

    def update_importance(self) -> None:  # sensitivity() is detached: no autograd graph here
        for name in ("lora_A", "lora_E", "lora_B"):
            self.importance.update(name, rb.sensitivity(getattr(self, name)))

    def unit_scores(self) -> Tensor:
        """S_i (r,): I U(E_i) + mean_j I U(A_ij) + mean_j I U(B_ji), as peft sums them."""
        imp = self.importance
        if not imp.has("lora_E"):
            return torch.zeros(self.n_units, device=self.lora_E.device)
        a = imp.score("lora_A").mean(dim=1, keepdim=True)  # (r, 1)
        b = imp.score("lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
        return imp.score("lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1)  # (r,)

    @torch.no_grad()
    def set_keep(self, keep: Tensor | None) -> None:
        """Zero E outside `keep` (default: the current mask) and remember the mask."""
        if keep is not None:
            self.keep.copy_(keep.to(self.keep.device))
            self.recorded.fill_(True)
        self.lora_E.masked_fill_(~self.keep.view(-1, 1), 0.0)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _kept(self, t: Tensor, dim: int) -> Tensor:
        """t without the masked triplets; the parameter itself when all are kept (loading copies into it)."""
        return t if bool(self.keep.all()) else t[self.keep] if dim == 0 else t[:, self.keep]

    kept_A = property(lambda self: self._kept(self.lora_A, 0))  # (r_kept, in)
    kept_E = property(lambda self: self._kept(self.lora_E, 0))  # (r_kept, 1)
    kept_B = property(lambda self: self._kept(self.lora_B, 1))  # (out, r_kept)

    def disk_names(self) -> dict[str, str]:
        return {"kept_A": "lora_A", "kept_E": "lora_E", "kept_B": "lora_B"}

    def layer_fields(self) -> dict[str, Any] | None:
        """{"rank_pattern": [bool] * r0}: the r0 triplets this layer keeps; None unless `recorded` (loaded, pruned)."""
        kept = iter(self.keep.tolist())
        return {"rank_pattern": [bool(next(kept)) if held else False for held in self.rows]} if self.recorded else None

    def train_state(self) -> dict[str, Tensor]:  # keep, recorded (buffers) and the importance EMAs (full size)
        return super().train_state() | self.importance.state(dict(self.named_parameters(recurse=False)))

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        super().load_train_state(self.importance.load_state(state, dict(self.named_parameters(recurse=False))))

