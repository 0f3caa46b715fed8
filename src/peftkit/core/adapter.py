"""The method interface: one adapter's math on one base layer."""

from __future__ import annotations

import re
from abc import ABCMeta, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MergeError
from .config import AdapterConfig
from .layers import LayerOps

__all__ = ["Adapter", "AdapterContext", "LowRank"]


@dataclass
class AdapterContext:
    """What an adapter may know beyond its own layer while it is built.

    path: this layer's module path. targets: every path the adapter is built on, in model order.
    shared: one dict per injection (all layers of one adapter name), for state shared across layers:
      parameters (a vector bank, a shared factor pair) and references to the adapters of earlier layers.
    """

    path: str = ""
    targets: tuple[str, ...] = ()
    shared: dict[str, Any] = field(default_factory=dict)

    def layer_index(self, path: str | None = None) -> int | None:
        """The first integer path component (`model.layers.3.mlp.up_proj` -> 3), or None."""
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", self.path if path is None else path)
        return int(m.group(1)) if m else None


class LowRank:
    """Canonical servable form of an adapter's contribution, low-rank factors plus optional per-channel scales.

    With d = scale * (up(down(x, A), B) + bias) and z = W x the base output without bias:
        contribution = d                          when out_scale is None (LoRA, rsLoRA, VeRA-like, LoRA-XS-like)
        contribution = out_scale * (z + d) - z    otherwise (DoRA: out_scale = m / ||W + s B A||_row; IA3-like
                                                  output scaling: rank 0 and out_scale = l)
    A: (r, in...) in the layer's a_shape, B: (out, r...) in b_shape (r may be 0), scale: float,
    bias: (out,) or None, out_scale: (out,) or None (both fixed tensors, detached).
    `plain` (no channel scale, no bias) is the form that linear/cat combination and vLLM export accept.
    """

    def __init__(self, a: Tensor, b: Tensor, scale: float, *, out_scale: Tensor | None = None,
                 bias: Tensor | None = None) -> None:
        self.a, self.b, self.scale = a, b, scale
        self.out_scale, self.bias = out_scale, bias

    @property
    def plain(self) -> bool:
        return self.out_scale is None and self.bias is None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def contribution(self, ops: LayerOps, x: Tensor, z: Tensor | None) -> Tensor:
        """The reference computation of what this form adds to the base output (z needed with out_scale)."""
        d = self.scale * ops.up(ops.down(ops.input_for(x, self.a.dtype), self.a), self.b)  # (..., out)
        if self.bias is not None:
            d = d + self.scale * ops.channel(self.bias)
        if self.out_scale is None:
            return d
        if z is None:
            raise ValueError("LowRank.contribution: a channel-scaled form needs the base output z")
        zs = z.to(d.dtype)
        return ops.channel(self.out_scale).to(d.dtype) * (zs + d) - zs


class Adapter(nn.Module, metaclass=ABCMeta):
    """One adapter on one layer. Subclasses declare tensors in __init__ and implement `forward`.

    Contract:
      forward(x, z) returns the contribution added to the base output, where x is the layer input
        and z the base output without bias (only computed when `needs_base_output`).
      delta_weight() -> D, (out, in_flat) fp32, and row_scale(W) -> a (out,) or None: merging alone gives
        W' = a * (W + D) (a = 1 when None). Requires capability "mergeable". Adapters with a row scale
        must set needs_base_output (their contribution depends on W). When D itself is computed from W
        (BoRA-style double normalization) set delta_reads_base: the host keeps D from merge time for unmerge.
      disk_names(): tensor (parameter or persistent buffer) name -> PEFT key suffix; checkpoint/ adds the
        module prefix. shared_disk_names(): tensors shared by all layers -> model-level key (written once).
      init_delta: what the base weight gave up to this adapter (out, in_flat): set by base-mutating inits or by
        `shift_base`; the host subtracts it when the adapter is added and adds it back when it is deleted.

    Capabilities: "mergeable" (delta_weight), "servable" (lowered), "identity_at_init" (output equals the base
    right after injection). Class hooks for data-driven inits and output-space regularizers:
      calibration: the statistics `calibrate(stats)` needs, a subset of {"grad", "input_cov", "output_cov"}
        (see core.calibrate); empty = no data needed.
      output_losses(config, logits, reference): regularizers on the model output, with `reference` the base
        model's output for the same batch (only computed when `needs_reference_output`).
    """

    method_name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    needs_base_output: ClassVar[bool] = False
    lr_scale: ClassVar[dict[str, float]] = {}  # parameter attribute -> learning-rate multiplier in training
    train_scalars: ClassVar[tuple[str, ...]] = ()  # Python attributes a resumed run needs (see train_state)
    transforms_inputs: ClassVar[bool] = False  # transform_inputs rewrites the model's call (prompt tuning)
    delta_reads_base: ClassVar[bool] = False  # delta_weight() depends on the base weight: kept from merge time
    calibration: ClassVar[frozenset[str]] = frozenset()
    needs_reference_output: ClassVar[bool] = False

    def __init__(self, ops: LayerOps, config: AdapterConfig, initialize: bool = True,
                 ctx: AdapterContext | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.config = config
        self.init_delta: Tensor | None = None

    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        """Checks a config selecting this method must pass beyond its class's `validate` (a method sharing a config
        class with others: fields only it reads, combinations only it refuses); raise ConfigError naming the field."""

    @abstractmethod
    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        """The contribution added to the base output for layer input x (z: base output without bias)."""

    def add_to(self, y: Tensor, x: Tensor, z: Tensor | None) -> Tensor:
        """y + forward(x, z); override to fuse the addition. y is the running layer output and may be updated in
        place; when `y is z` no other adapter reads z afterwards (see AdaptedLayer.forward)."""
        return y + self.forward(x, z).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """D in W' = a * (W + D); only adapters with the "mergeable" capability provide it."""
        raise MergeError(f"{type(self).__name__} cannot be merged (no 'mergeable' capability)")

    def row_scale(self, w2d: Tensor) -> Tensor | None:
        """Per-output-row factor a (out,) of the merge W' = a * (W + D), given the base weight; None = 1."""
        return None

    def merged_bias(self, bias: Tensor | None, sign: int) -> Tensor | None:
        """The base bias after merging (sign=+1) or unmerging (sign=-1); None = bias untouched."""
        return None

    def lowered(self) -> LowRank | None:
        """The canonical low-rank form if the adapter has one (enables cat/linear combination and serving)."""
        return None

    def disk_names(self) -> dict[str, str]:
        return {name: name for name, _ in self.named_parameters(recurse=False)}

    def shared_disk_names(self) -> dict[str, str]:
        """Tensors shared by every layer of this adapter (attribute name -> key after "base_model.")."""
        return {}

    def root_disk_names(self) -> dict[str, str]:
        """Tensors written once under a key used verbatim, outside "base_model." (peft's "prompt_embeddings")."""
        return {}

    def optional_disk_names(self) -> dict[str, tuple[int, ...]]:
        """Keys (suffix -> shape) this adapter may write beside its required ones and reads when a file has them,
        e.g. the starting factors of a base-mutating init, so that loading onto the original base can take the
        same part of the weight again. Files without them (written by peft) still load."""
        return {}

    def optional_state(self) -> dict[str, Tensor]:
        """The optional tensors to write (suffix -> tensor); a subset of optional_disk_names()."""
        return {}

    def load_optional(self, tensors: dict[str, Tensor]) -> None:
        """Receive the optional tensors a file had (suffix -> tensor, shapes already checked), before after_load."""

    def after_load(self) -> None:
        """Called after checkpoint tensors were copied in, before the adapter joins the model (e.g. to derive
        init_delta from loaded state)."""

    def calibrate(self, stats: dict[str, Tensor]) -> None:
        """Initialize from data statistics (see `calibration`); may set init_delta."""

    def shift_base(self, delta2d: Tensor) -> None:
        """Add delta2d (out, in_flat) into the base weight during training (periodic merges) and remember it,
        so that deleting or unloading this adapter takes it back out."""
        self.ops.add_weight2d(delta2d)
        taken = -delta2d.detach().float()
        self.init_delta = taken if self.init_delta is None else self.init_delta + taken

    def state_for_original_base(self) -> dict[str, Tensor] | None:
        """Tensors (by parameter name) that apply to the base weight as it was before this adapter's init
        changed it; None when the init left the base alone."""
        return None

    def extra_losses(self) -> dict[str, Tensor]:
        """Named regularizers added to the training loss (empty for most methods)."""
        return {}

    def on_step(self, step: int) -> Iterable[nn.Parameter] | None:
        """Called after each optimizer step (rank schedules, mask updates, periodic merges). Returns the
        parameters whose optimizer state must be reset (they were re-initialized), or None."""
        return None

    def transform_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the wrapped model's keyword arguments before it runs (only for classes that set
        `transforms_inputs`), e.g. prepend soft-prompt embeddings and extend attention_mask and labels."""
        return kwargs

    def train_state(self) -> dict[str, Tensor]:
        """Training state that is not part of the saved adapter but a resumed run needs to continue exactly
        (importance averages, gradient statistics, the step a schedule switched). Default: the non-persistent
        buffers, and the Python attributes named in `train_scalars` (int, bool or None) as int64 pairs
        [is set, value]. Training checkpoints store it; methods keeping other state override both methods."""
        buffers = {n: b for n, b in self.named_buffers(recurse=False) if n in self._non_persistent_buffers_set}
        values = {n: getattr(self, n) for n in self.train_scalars}
        return buffers | {n: torch.tensor([v is not None, int(v or 0)], dtype=torch.long) for n, v in values.items()}

    def load_train_state(self, state: dict[str, Tensor]) -> None:
        """Restore what `train_state` returned (same keys; shapes checked by the caller)."""
        for name, value in state.items():
            if name in self.train_scalars:
                is_set, number = value.tolist()
                now = getattr(self, name)
                setattr(self, name, (int if now is None else type(now))(number) if is_set else None)
            else:
                self.register_buffer(name, value.to(getattr(self, name)), persistent=False)

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and clipping, before optimizer step `step` (gradient masks)."""

    def layer_fields(self) -> dict[str, Any] | None:
        """Config fields this layer now differs in (e.g. {"r": 5} after rank pruning or growth); save_adapter
        records them through `AdapterConfig.with_layer_fields` so loading allocates the current shapes."""
        return None

    @classmethod
    def output_losses(cls, config: AdapterConfig, logits: Tensor, reference: Tensor | None) -> dict[str, Tensor]:
        """Named regularizers on the model output (logits (..., V)); reference: base output, no grad."""
        return {}

    def cast_input(self, x: Tensor, like: Tensor) -> Tensor:
        return self.ops.input_for(x, like.dtype)

    @staticmethod
    def new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
