"""ResLoRA (arXiv 2402.18039): shortcuts between the LoRA branches of one module type in consecutive layers.

Methods "reslora" (res_bs, exact merge), "reslora_is" and "reslora_ms" (approximate merge, opt-in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.adapter import AdapterContext
from ..core.layers import LayerOps
from ..core.registry import register_adapter, register_config
from ..errors import ConfigError, MergeError, PeftkitError
from .lora import LoraAdapter, LoraConfig

__all__ = ["ResLoraConfig", "ResLoraIsConfig", "ResLoraMsConfig", "ResLoraAdapter", "ResLoraIsAdapter",
           "ResLoraMsAdapter"]

MODES = {"bs": "reslora", "is": "reslora_is", "ms": "reslora_ms"}
WINDOW = 100  # training batches in the running mean of the norms (reference merge_4_len)


@register_config
@dataclass(frozen=True, kw_only=True)
class ResLoraConfig(LoraConfig):
    """LoRA's fields and defaults (the paper trains r=16, alpha=32, dropout 0.05) plus reslora_mode "bs" | "is" |
    "ms" (selects the method), reslora_pre_num p (previous layers a shortcut reaches; 0 = plain LoRA) and
    reslora_approx_merge (allow the approximate is/ms merge). ResLoraIs/MsConfig only change the default mode."""

    peft_type: ClassVar[str] = "RESLORA"
    method_name: ClassVar[str] = "reslora"
    reslora_mode: str = "bs"
    reslora_pre_num: int = 1
    reslora_approx_merge: bool = False

    def validate(self) -> None:
        super().validate()
        if self.reslora_mode not in MODES:
            raise ConfigError("reslora_mode", f"must be one of {sorted(MODES)} (bs: block shortcut, exact merge; "
                                              f"is: input; ms: middle shortcut), got {self.reslora_mode!r}")
        if type(self.reslora_pre_num) is not int or self.reslora_pre_num < 0:
            raise ConfigError("reslora_pre_num", f"must be an int >= 0 (0: plain LoRA), got {self.reslora_pre_num!r}")
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ConfigError(name, f"ResLoRA has no {name} variant; set {name}=False")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError("init_lora_weights", f"ResLoRA supports True, False or 'gaussian' (inits that move the "
                                                   f"base weight are refused), got {self.init_lora_weights!r}")

    @property
    def method(self) -> str:
        return MODES[self.reslora_mode]

    def for_original_base(self) -> ResLoraConfig:
        return self  # no accepted init changes the base weight


@register_config
@dataclass(frozen=True, kw_only=True)
class ResLoraIsConfig(ResLoraConfig):
    """ResLoraConfig with reslora_mode="is" by default (method "reslora_is")."""
    peft_type: ClassVar[str] = "RESLORA_IS"
    reslora_mode: str = "is"


@register_config
@dataclass(frozen=True, kw_only=True)
class ResLoraMsConfig(ResLoraConfig):
    """ResLoraConfig with reslora_mode="ms" by default (method "reslora_ms")."""
    peft_type: ClassVar[str] = "RESLORA_MS"
    reslora_mode: str = "ms"


class _Chain:
    """Per-forward state: `step` (the head adds 1 per call), records {position: (step, input or h)}."""
    def __init__(self) -> None:
        self.step, self.records = 0, {}

    def __deepcopy__(self, memo: dict) -> _Chain:
        return _Chain()  # records belong to one forward; a copy starts empty (never copies graph tensors)


def chain_key(path: str) -> str | None:
    """The module type: the path with its first integer component masked; None without a layer index."""
    parts = path.split(".")
    i = next((k for k, part in enumerate(parts) if part.isdigit()), None)
    return None if i is None else ".".join([*parts[:i], "*", *parts[i + 1:]])


@register_adapter("reslora", ResLoraConfig)
class ResLoraAdapter(LoraAdapter):
    """ResLoRA (arXiv 2402.18039), res_bs: y = W x + b + sum_{j=0..p} s B_{l-j} A_{l-j} drop(x_l).

    Earlier layers' factors act on this input (and get gradients from it). Exact merge: W'_l = W_l + s sum_j
    B_{l-j} A_{l-j}. No layer index, an embedding, or factor shapes unlike the predecessor's: a new chain."""

    capabilities = frozenset({"mergeable", "identity_at_init"})
    tracks_norms = False  # is/ms: running norms for the approximate merge

    def __init__(self, ops: LayerOps, config: ResLoraConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__(ops, config, initialize, ctx)
        self.train(ops.module.training)  # start in the base layer's mode (dropout, norm tracking)
        self._prev: tuple[ResLoraAdapter, ...] = ()  # plain tuple: not registered, not in state_dict
        self._chain, self._pos, self._path = None, 0, ctx.path if ctx is not None else ""
        key = chain_key(ctx.path) if ctx is not None else None
        if key is not None and ops.kind != "embedding" and config.reslora_pre_num > 0:
            self._join(ctx.shared.setdefault("reslora_chains", {}), key, config.reslora_pre_num)
        if self.tracks_norms:
            self.register_buffer("reslora_norms", torch.zeros(WINDOW, device=ops.weight.device))  # (100,) newest 1st
            self.register_buffer("reslora_count", torch.zeros((), device=ops.weight.device))  # batches (float)

    def _join(self, chains: dict[str, list[ResLoraAdapter]], key: str, p: int) -> None:
        members = chains.get(key)
        geometry = (self.ops.kind, self.lora_A.shape, self.lora_B.shape)
        if not members or (members[-1].ops.kind, members[-1].lora_A.shape, members[-1].lora_B.shape) != geometry:
            members = chains[key] = []
        self._chain = members[0]._chain if members else _Chain()
        self._pos, self._prev = len(members), tuple(reversed(members[-p:]))  # (l-1, ..., l-p)
        members.append(self)

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        xd = self.dropout(x)
        y = self.ops.up(self.project(xd), self.lora_B)  # (..., out)
        for prev in self._prev:
            y = y + self.ops.up(prev.project(xd), prev.lora_B)  # (..., out): s B_{l-j} A_{l-j} x_l
        return y

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        return y + self.forward(x, z).to(y.dtype)

    def delta_weight(self) -> Tensor:
        return sum((LoraAdapter.delta_weight(a) for a in self._prev), LoraAdapter.delta_weight(self))

    def lowered(self) -> None:
        return None


@register_adapter("reslora_is", ResLoraIsConfig)
class ResLoraIsAdapter(ResLoraAdapter):
    """ResLoRA (arXiv 2402.18039), res_is: y = W x + b + s B_l A_l drop(x_l + sum_{j=1..p} x_{l-j}).

    x_{l-j}: the input layer l-j got earlier in this forward (with its graph). Merge only if reslora_approx_merge:
    W' = W + (1 + alpha_l) s B_l A_l, alpha_l = sum_j mean||x_{l-j}|| / mean||x_l|| over 100 training batches."""
    capabilities = frozenset({"identity_at_init"})
    tracks_norms = True
    middle = False  # res_ms: the shortcut carries h = A drop(x) instead of x

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        if self._chain is None:
            return LoraAdapter.forward(self, x, z)
        if not self.middle:
            return self.ops.up(self.project(self.dropout(self._shortcut(x))), self.lora_B)  # (..., out)
        h = self.ops.down(self.cast_input(self.dropout(x), self.lora_A), self.lora_A)  # (..., r) = A_l drop(x_l)
        return self.ops.up(self._shortcut(h) * self.scaling, self.lora_B)  # (..., out)

    def _shortcut(self, t: Tensor) -> Tensor:
        """Track ||t|| (training), record t for the next layers, add the previous p layers' records of this forward."""
        if self.training:
            with torch.no_grad():
                self.reslora_norms.copy_(torch.roll(self.reslora_norms, 1))  # (100,) drop the oldest
                self.reslora_norms[0] = torch.linalg.vector_norm(t.detach().float())
                self.reslora_count.add_(1)
        chain = self._chain
        chain.step += self._pos == 0
        chain.records[self._pos] = (chain.step, t)
        for prev in self._prev:
            step, rec = chain.records.get(prev._pos, (None, None))
            if step != chain.step or rec.shape != t.shape:
                got = "nothing" if step != chain.step else tuple(rec.shape)
                raise PeftkitError(f"{self._path}: ResLoRA needs {prev._path}'s {tuple(t.shape)} from earlier in this "
                                   f"forward, got {got}; chained layers must run in order (else reslora_mode='bs')")
            t = t + rec
        return t

    def merge_alpha(self) -> float:
        """alpha_l = sum_j mean_{l-j} / mean_l (a term is 1 when either mean is 0, as the reference code)."""
        means = [float(a.reslora_norms.sum() / a.reslora_count.clamp(1, WINDOW)) for a in (self, *self._prev)]
        return float(sum(m / means[0] if means[0] > 0 and m > 0 else 1.0 for m in means[1:]))

    def delta_weight(self) -> Tensor:
        if not self.config.reslora_approx_merge:
            raise MergeError(f"{self._path}: ResLoRA {self.config.reslora_mode} has no exact merge; set "
                             "reslora_approx_merge=True to merge W' = W + (1 + alpha) s B A (norm-ratio rule)")
        return (1 + self.merge_alpha()) * LoraAdapter.delta_weight(self)

    def disk_names(self) -> dict[str, str]:
        return super().disk_names() | {"reslora_norms": "reslora_norms", "reslora_count": "reslora_count"}


@register_adapter("reslora_ms", ResLoraMsConfig)
class ResLoraMsAdapter(ResLoraIsAdapter):
    """ResLoRA (arXiv 2402.18039), res_ms: y = W x + b + s B_l (h_l + sum_j h_{l-j}), h = A drop(x); merge: is, on h."""
    middle = True
