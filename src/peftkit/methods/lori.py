"""LoRI: LoRA with a frozen random A and a sparse task mask on B (dense stage LoRI-D, sparse stage LoRI-S)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import AdapterContext, LowRank
from ..core.host import AdaptedLayer
from ..core.layers import LayerOps
from ..core.model import AdapterModel
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from .lora import LoraAdapter, LoraConfig

__all__ = ["LoriConfig", "LoriAdapter", "sparsify", "SCOPES"]

SCOPES = ("global", "module")


@register_config
@dataclass(frozen=True, kw_only=True)
class LoriConfig(LoraConfig):
    """LoRI settings: LoRA's fields plus the mask schedule (peft_type "LORI"; peft has no such method).

    init_lora_weights: True (A kaiming-uniform, B = 0) or False (B random too, for tests). lori_seed: draw A of
    the i-th target layer (model order) from a generator seeded with lori_seed + i instead of the global RNG.
    lori_sparsity: the fraction rho of B entries the mask drops. lori_mask_scope: "global" (one threshold over
    every layer) or "module" (one per module name, e.g. all q_proj). lori_sparse_after_steps: after this
    optimizer step the masks are extracted and B restarts at 0 (LoRI-D -> LoRI-S); None = call `sparsify`.
    """

    peft_type: ClassVar[str] = "LORI"
    method_name: ClassVar[str] = "lori"

    lori_seed: int | None = None
    lori_sparsity: float = 0.9
    lori_mask_scope: str = "global"
    lori_sparse_after_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(name, "is not supported by LoRI; set it to False")
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError("init_lora_weights", "LoRI keeps A at its random kaiming init; use True (B = 0) or "
                                                   f"False (B random), got {self.init_lora_weights!r}")
        if not (isinstance(self.lori_sparsity, (int, float)) and 0 <= self.lori_sparsity < 1):
            raise ConfigError("lori_sparsity", f"must be in [0, 1), got {self.lori_sparsity!r}")
        if self.lori_mask_scope not in SCOPES:
            raise ConfigError("lori_mask_scope", f"must be one of {SCOPES}, got {self.lori_mask_scope!r}")
        for name, low in (("lori_sparse_after_steps", 1), ("lori_seed", 0)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ConfigError(name, f"must be None or an integer >= {low}, got {v!r}")

    def for_original_base(self) -> LoriConfig:
        return self  # LoRI never changes the base weight


@register_adapter("lori", LoriConfig)
class LoriAdapter(LoraAdapter):
    """LoRI (arXiv 2504.07448): y = W x + b + s * (M_B * B) A drop(x), s as LoRA's.

    A (r, in...): frozen kaiming-uniform, a persistent buffer. B (out, r...): trainable, starts at 0. M_B: a
    persistent 0/1 buffer, all ones in LoRI-D. Masking in the forward zeroes dL/dB outside M_B, so AdamW (decoupled
    decay) keeps B = 0 there after the restart. `sparsify` keeps the top (1 - rho) of |B| and resets B to 0.
    Merge: W' = W + s * (M_B * B) A, exact.
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: LoriConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        if ops.kind == "embedding":
            raise UnsupportedLayerError("lori supports Linear, Conv1D and Conv layers, not embeddings")
        super().__init__(ops, config, initialize=False, ctx=ctx)
        a = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", a)  # (r, in...), frozen
        self.register_buffer("lora_B_mask", torch.ones_like(self.lora_B.detach()))  # (out, r...)
        self._lori = ctx.shared if ctx is not None else {}  # every layer of this adapter, for global thresholds
        self._lori.setdefault("layers", []).append((ctx.path if ctx is not None else "", self))
        if initialize:
            self._draw(config, ctx)

    @torch.no_grad()
    def _draw(self, config: LoriConfig, ctx: AdapterContext | None) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)); with lori_seed, from seed + this layer's index among the targets."""
        gen = None
        if config.lori_seed is not None:
            index = ctx.targets.index(ctx.path) if ctx is not None and ctx.path in ctx.targets else 0
            gen = torch.Generator().manual_seed(config.lori_seed + index)
        a = torch.empty(self.lora_A.shape)  # (r, in...) on CPU, so the seeded draw is device independent
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        self.lora_A.copy_(a)
        if not config.init_lora_weights:
            b = torch.empty(self.lora_B.shape)  # (out, r...)
            nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
            self.lora_B.copy_(b)

    def masked_B(self) -> Tensor:
        return self.lora_B * self.lora_B_mask  # (out, r...)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up(self.project(self.dropout(x)), self.masked_B())  # (..., out)

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return self.ops.up_add_(y, self.project(self.dropout(x)), self.masked_B())  # y += s (M*B) A drop(x)

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return self.scaling * (flat(self.masked_B()).float() @ flat(self.lora_A).float())  # (out, in_flat)

    def lowered(self) -> LowRank:
        return LowRank(self.lora_A, self.masked_B().detach(), self.scaling)

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"lora_B_mask": "lora_B_mask"}

    def on_step(self, step: int) -> list[nn.Parameter] | None:
        """At step lori_sparse_after_steps the first layer to see it sets the masks of every layer (one global
        threshold); each layer returns its B so the optimizer forgets the dense stage's moments."""
        cfg = self.config
        if cfg.lori_sparse_after_steps is None or step != cfg.lori_sparse_after_steps:
            return None
        if self._lori.get("sparsified_at") != step:
            self._lori["sparsified_at"] = step
            set_masks(self._lori["layers"], cfg.lori_sparsity, cfg.lori_mask_scope)
        return [self.lora_B]


@torch.no_grad()
def set_masks(layers: list[tuple[str, LoriAdapter]], sparsity: float, scope: str = "global") -> None:
    """Keep the round((1 - sparsity) * n) largest |B| entries over each group (all layers, or one module name),
    set the masks and restart B at 0 (A unchanged)."""
    groups: dict[str, list[LoriAdapter]] = {}
    for path, adapter in layers:
        groups.setdefault(path.rsplit(".", 1)[-1] if scope == "module" else "", []).append(adapter)
    for adapters in groups.values():
        scores = torch.cat([a.lora_B.detach().abs().float().flatten().cpu() for a in adapters])  # (n,)
        keep = torch.zeros_like(scores)
        keep[scores.topk(round((1 - sparsity) * scores.numel())).indices] = 1
        for adapter, part in zip(adapters, keep.split([a.lora_B.numel() for a in adapters]), strict=True):
            adapter.lora_B_mask.copy_(part.view_as(adapter.lora_B_mask))
            adapter.lora_B.zero_()


def sparsify(model: AdapterModel, name: str = "default", sparsity: float | None = None, scope: str | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> list[nn.Parameter]:
    """LoRI-D -> LoRI-S for adapter `name`: masks from |B| (default rho and scope from its config), B reset to 0.
    Returns the reset B parameters; their state in `optimizer` (if given) is dropped."""
    model._check_names([name])
    config = model.configs[name]
    if not isinstance(config, LoriConfig):
        raise ConfigError("name", f"adapter {name!r} is a {config.method!r} adapter; sparsify needs a LoRI adapter")
    sparsity = config.lori_sparsity if sparsity is None else sparsity
    scope = config.lori_mask_scope if scope is None else scope
    config.replace(lori_sparsity=sparsity, lori_mask_scope=scope)  # validates both, naming the field
    layers = [(p, h.adapters[name]) for p, h in model.hosts() if isinstance(h, AdaptedLayer) and name in h.adapters]
    set_masks(layers, sparsity, scope)
    params = [adapter.lora_B for _, adapter in layers]
    for p in params if optimizer is not None else ():
        optimizer.state.pop(p, None)
    return params
