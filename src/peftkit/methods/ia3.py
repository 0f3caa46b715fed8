"""(IA)^3: learned per-channel rescaling of a layer's output, or of its input for feed-forward modules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.adapter import Adapter, AdapterContext
from ..core.config import AdapterConfig
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, UnsupportedLayerError
from ..models.presets import FEEDFORWARD_MODULES
from .lora import adapter_dtype

__all__ = ["IA3Config", "IA3Adapter"]


@register_config
@dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)^3 settings with peft's field names (peft_type "IA3").

    feedforward_modules: modules scaled on the input side (peft's rule: a str is `re.fullmatch`ed on the module
    path, a list entry matches when the path ends with it); every other target is scaled on the output side.
    None = no feed-forward module (peft instead fills it from its per-architecture table: pass it explicitly,
    e.g. ["down_proj"] for Llama, ["mlp.c_proj"] for GPT-2). A list must be a subset of a list target_modules.
    init_ia3_weights: True = l = 1 (identity); False = l ~ N(0, 1) as peft.
    fan_in_fan_out: accepted for compatibility; Conv1D layers are detected by type.
    """

    peft_type: ClassVar[str] = "IA3"
    method_name: ClassVar[str] = "ia3"

    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self) -> None:
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str):
            ff = tuple(ff)
            if not all(isinstance(k, str) for k in ff):
                raise ConfigError("feedforward_modules", f"expected a regex or a list of module names, got {ff!r}")
            self._set("feedforward_modules", ff)
            targets = self.target_modules
            if isinstance(targets, tuple) and not set(ff) <= set(targets):
                missing = sorted(set(ff) - set(targets))
                raise ConfigError("feedforward_modules", f"{missing} are not in target_modules; feed-forward modules "
                                                         "must be a subset of target_modules (add them there)")
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")

    def for_model(self, model_type: str | None) -> IA3Config:
        """feedforward_modules=None takes the architecture's FFN output projection (as peft does), kept to the
        targeted modules."""
        preset = FEEDFORWARD_MODULES.get(model_type or "")
        if self.feedforward_modules is not None or not preset:
            return self
        targets = self.target_modules
        keep = tuple(m for m in preset if not isinstance(targets, tuple) or any(t.endswith(m) or m.endswith(t)
                                                                                  for t in targets))
        if not keep:
            return self
        filled = self.replace()  # a copy; the subset rule is for user-given lists (a preset matches by suffix)
        filled._set("feedforward_modules", keep)
        return filled

    def is_feedforward(self, path: str) -> bool:
        """peft's IA3Model._check_target_module_feedforward."""
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(key) for key in ff)


@register_adapter("ia3", IA3Config)
class IA3Adapter(Adapter):
    """(IA)^3 (arXiv 2205.05638): output side y = l * (W x + b); input side (feed-forward) y = W (l * x) + b.

    l = 1 at init. Stored as peft does: (out, 1) for the output side and (1, in) for the input side of Linear and
    Conv1D, (1, C, 1, ...) for convolutions; key `ia3_l`. Contribution added to the base output: (l - 1) * (W x + b)
    or W ((l - 1) * x).
    Merge: D = (l - 1) * W on the rows (output side) or the columns (input side), and b' = b + (l - 1) * b. D and
    the bias shift are taken from the base at merge time and kept, so unmerge subtracts them instead of dividing
    by l: exact (to rounding) even where l_i = 0, with no epsilon needed (peft divides by l + 1e-8).
    Several active (IA)^3 adapters on one layer add their contributions (peft multiplies the scales).
    """

    capabilities = frozenset({"mergeable", "identity_at_init"})
    needs_base_output = True  # the output side scales W x + b
    delta_reads_base = True

    def __init__(self, ops: LayerOps, config: IA3Config, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        if ops.kind == "embedding":
            raise UnsupportedLayerError("(IA)^3 supports Linear, Conv1D and convolution layers, not embeddings")
        self.feedforward = config.is_feedforward(ctx.path if ctx is not None else "")
        shape = self._shape()
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=adapter_dtype(ops), device=ops.weight.device))
        if initialize and not config.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.normal_()
        self._bias_shift: Tensor | None = None  # (out,): b' - b of the current merge
        self._merged = False

    def _shape(self) -> tuple[int, ...]:
        if self.ops.kind == "conv":
            w = self.ops.weight  # (out, in, k...)
            return (1, w.shape[1] if self.feedforward else w.shape[0], *([1] * (w.dim() - 2)))
        return (1, self.ops.in_features) if self.feedforward else (self.ops.out_features, 1)

    def _column_scale(self, scale: Tensor) -> Tensor:
        """scale (in channels) -> (in_flat,), repeated over a convolution's kernel positions."""
        return scale.flatten().repeat_interleave(self.ops.in_features // scale.numel())

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        scale = self.ia3_l
        if self.feedforward:
            w = self.ops.weight2d().to(scale.dtype).reshape(self.ops.a_shape(self.ops.out_features))  # native layout
            return self.ops.down(self.cast_input(x, scale) * (scale - 1), w)  # (..., out): W ((l - 1) * x)
        if z is None:
            raise ValueError("output-side (IA)^3 needs the base output z = W x")
        y = z.to(scale.dtype)
        if self.ops.bias is not None:
            y = y + self.ops.channel(self.ops.bias.to(scale.dtype))
        return self.ops.channel(scale.flatten() - 1) * y  # (..., out): (l - 1) * (W x + b)

    def delta_weight(self) -> Tensor:
        w = self.ops.weight2d().detach().float()  # (out, in_flat)
        scale = self.ia3_l.detach().float()
        if self.feedforward:
            return w * (self._column_scale(scale) - 1)[None, :]  # (out, in_flat): W diag(l) - W
        bias = self.ops.bias
        if not self._merged:  # the host calls delta_weight on the unmerged base, before any bias shift
            self._bias_shift = None if bias is None else (scale.flatten() - 1) * bias.detach().float()  # (out,)
        return w * (scale.flatten() - 1)[:, None]  # (out, in_flat): diag(l) W - W

    def merged_bias(self, bias: Tensor | None, sign: int) -> Tensor | None:
        """b' = b + (l - 1) b with b the bias before this merge (kept, so unmerge subtracts the same shift and
        several merged adapters add their shifts as their contributions add)."""
        if self.feedforward or bias is None:
            return None
        if self._bias_shift is None:
            self._bias_shift = (self.ia3_l.detach().float().flatten() - 1) * bias.detach().float()
        self._merged = sign > 0
        return bias + sign * self._bias_shift.to(bias.dtype)

    def disk_names(self) -> dict[str, str]:
        return {"ia3_l": "ia3_l"}
