"""MSPLoRA: a pyramid of LoRAs per module type: global (shared by all layers), mid-level (shared within a
contiguous group of layers) and local (one per layer), with ranks halving level by level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext, LowRank
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError
from .common import adapter_dtype, check_alpha, check_rank
from .inits import init_factors
from .s2lora import shape_key

__all__ = ["MSPLoraConfig", "MSPLoraAdapter", "level_groups"]

MAX_LEVELS = 8


@register_config
@dataclass(frozen=True, kw_only=True)
class MSPLoraConfig(AdapterConfig):
    """MSPLoRA settings (peft_type "MSPLORA"; not in peft).

    r: rank of the global level; level l has rank r / 2^l, so r must be divisible by 2^(msp_levels-1).
    lora_alpha: level l scales by lora_alpha / r_l. lora_dropout: dropout on the adapter input (one mask for all
    levels). msp_levels: 1 = global only, 2 = global + local, 3 = global + thirds + local (default); level l
    in between splits the layers into 3^l contiguous groups.
    """

    peft_type: ClassVar[str] = "MSPLORA"
    method_name: ClassVar[str] = "msplora"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    msp_levels: int = 3

    def validate(self) -> None:
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        levels = self.msp_levels
        if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= MAX_LEVELS:
            raise ConfigError("msp_levels", f"must be an integer in [1, {MAX_LEVELS}], got {levels!r}")
        if self.r % 2 ** (levels - 1):
            raise ConfigError("r", f"r={self.r} must be divisible by 2^(msp_levels-1)={2 ** (levels - 1)} so every "
                                   f"level's rank r/2^l is an integer; use e.g. r={2 ** (levels - 1) * 4}")

    def rank(self, level: int) -> int:
        return self.r // 2**level


def level_groups(position: int, count: int, levels: int) -> list[int]:
    """Group of the layer at `position` (0-based, among `count` layers) at each level: level 0 has one group,
    the last level one group per layer, level l in between 3^l contiguous groups (at most `count`)."""
    out = []
    for level in range(levels):
        groups = 1 if level == 0 else count if level == levels - 1 else min(3**level, count)
        out.append(position * groups // count)
    return out


def _module_type(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _groups(ctx: AdapterContext | None, levels: int) -> list[int | None]:
    """This layer's group per level; None = a level this layer has no pair at (modules without a layer index
    only get the global and the local level)."""
    index = ctx.layer_index() if ctx is not None else None
    if index is None:
        return [0] + [None] * (levels - 2) + [0] if levels > 1 else [0]
    kind = _module_type(ctx.path)
    same = sorted({i for t in ctx.targets if _module_type(t) == kind and (i := ctx.layer_index(t)) is not None})
    return level_groups(same.index(index), len(same), levels)


@register_adapter("msplora", MSPLoraConfig)
class MSPLoraAdapter(Adapter):
    """MSPLoRA (arXiv 2503.21838): y = W x + b + sum_l (alpha / r_l) B_l A_l drop(x), r_l = r / 2^l.

    Level 0 (global) is one pair per module type (last path component) and layer shape, shared by every layer;
    the middle levels are shared within contiguous groups of layer indices; the last level is per layer.
    Shared levels are the same Parameter objects. Init per level: A kaiming-uniform, B = 0 (identity at init).
    Merge: W' = W + sum_l s_l B_l A_l, exact.
    """

    capabilities = frozenset({"mergeable", "servable", "identity_at_init"})

    def __init__(self, ops: LayerOps, config: MSPLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        self.dtype, self.device, self.initialize = adapter_dtype(ops), ops.weight.device, initialize
        groups = _groups(ctx, config.msp_levels)
        self.local = config.msp_levels - 1 if config.msp_levels > 1 else None  # level 0 is always shared
        shared = ctx.shared if ctx is not None else {}
        prefix = f"msplora.{_module_type(ctx.path) if ctx is not None else 'layer'}.{shape_key(ops)}"
        self.levels: list[int] = []
        self.scales: list[float] = []
        self._shared_keys: dict[str, str] = {}
        for level, group in enumerate(groups):
            if group is None:
                continue
            if level == self.local:
                a, b = self._pair(config.rank(level))
            else:
                key = f"{prefix}.level{level}.group{group}"
                if key not in shared:  # the first layer of the group creates the pair
                    shared[key] = self._pair(config.rank(level))
                a, b = shared[key]
                self._shared_keys |= {f"msplora_A{level}": f"{key}.lora_A", f"msplora_B{level}": f"{key}.lora_B"}
            setattr(self, f"msplora_A{level}", a)  # (r_l, in...)
            setattr(self, f"msplora_B{level}", b)  # (out, r_l...)
            self.levels.append(level)
            self.scales.append(config.lora_alpha / config.rank(level))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _pair(self, r: int) -> tuple[nn.Parameter, nn.Parameter]:
        ops = self.ops
        a = torch.zeros(ops.a_shape(r), dtype=self.dtype, device=self.device)
        b = torch.zeros(ops.b_shape(r), dtype=self.dtype, device=self.device)
        if self.initialize:
            a0, b0, _ = init_factors(True, ops.weight2d(), r, 1.0, ops.kind == "embedding")
            a.copy_(a0.reshape(a.shape))
            b.copy_(b0.reshape(b.shape))
        return nn.Parameter(a), nn.Parameter(b)

    def pairs(self) -> list[tuple[Tensor, Tensor, float]]:
        """(A_l, B_l, s_l) for every level this layer has."""
        return [(getattr(self, f"msplora_A{lv}"), getattr(self, f"msplora_B{lv}"), s)
                for lv, s in zip(self.levels, self.scales, strict=True)]

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        x, y = self.dropout(x), None
        for a, b, s in self.pairs():
            h = self.ops.down(self.cast_input(x, a), a) * s  # (..., r_l)
            y = self.ops.up(h, b) if y is None else self.ops.up_add(y, h, b)  # (..., out)
        return y

    def delta_weight(self) -> Tensor:
        flat = self.ops.flat
        return sum(s * (flat(b).float() @ flat(a).float()) for a, b, s in self.pairs())  # (out, in_flat)

    def lowered(self) -> LowRank:
        """All levels side by side, each level's scale folded into its B: one rank sum_l r_l LoRA with s = 1."""
        pairs = self.pairs()
        a = torch.cat([a for a, _, _ in pairs], dim=0)  # (sum r_l, in...)
        b = torch.cat([b * s for _, b, s in pairs], dim=1)  # (out, sum r_l...)
        return LowRank(a, b, 1.0)

    def disk_names(self) -> dict[str, str]:
        if self.local is None:
            return {}
        return {f"msplora_A{self.local}": "msplora_local_A", f"msplora_B{self.local}": "msplora_local_B"}

    def shared_disk_names(self) -> dict[str, str]:
        return dict(self._shared_keys)
