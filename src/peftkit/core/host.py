"""The one multi-adapter host: a base layer plus named adapters, with activation, merging and routing.

Every bit of "several adapters on one layer" bookkeeping lives here (and in `ModulesToSave` for whole-module
copies). Methods only implement one adapter's math.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import MergeError, NonFiniteWeightError
from .adapter import Adapter
from .layers import LayerOps

__all__ = ["AdaptedLayer", "ModulesToSave", "Routing", "BASE"]

BASE = "__base__"  # routing name for rows that use no adapter


class Routing:
    """Per-batch routing shared by all hosts of one model: `rows[i]` is the adapter name for batch row i.

    executor: when set (by `serve/`), routed layers call executor(layer, x, y) -> y instead of the reference
    per-adapter loop, so a serving model computes the adapters of a whole batch with its batched op.
    """

    def __init__(self) -> None:
        self.rows: tuple[str, ...] | None = None
        self.executor: Callable[[AdaptedLayer, Tensor, Tensor], Tensor] | None = None

    def groups(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        """{adapter name: row indices} for the current batch."""
        if self.rows is None or len(self.rows) != batch:
            got = None if self.rows is None else len(self.rows)
            raise ValueError(f"adapter_names has {got} entries but the batch has {batch} rows; pass one per row")
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.rows):
            out.setdefault(name, []).append(i)
        return {k: torch.tensor(v, device=device) for k, v in out.items()}


class AdaptedLayer(nn.Module):
    """A base layer (`base_layer`, frozen) with adapters (`adapters[name]`) whose outputs add.

    State: `active` (names whose contribution is added), `merged` (stack of names folded into the base
    weight), `disabled` (base only). `routing` (shared per model) selects one adapter per batch row instead.
    """

    def __init__(self, base_layer: nn.Module, ops: LayerOps, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.ops = ops
        self.routing = routing
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self._scales: dict[str, Tensor | None] = {}
        self._deltas: dict[str, Tensor] = {}  # D at merge time, for adapters whose D depends on W
        self.disabled = False

    # --- adapters ---------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        adapter.train(self.training)  # a new adapter follows the model's train/eval mode
        if adapter.init_delta is not None:
            self.ops.add_weight2d(-adapter.init_delta)  # W_res = W - init part (PiSSA-style inits)
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise MergeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        adapter = self.adapters[name]
        if adapter.init_delta is not None:
            self.ops.add_weight2d(adapter.init_delta)
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.ops.token_wise and x.dim() > 2 and self.routing.rows is None and not (args or kwargs):
            return self._forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)  # (N, in) -> (N, out)
        return self._forward(x, *args, **kwargs)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Base output plus the active adapters' contributions. Token-wise layers get 2-D x here, so adapters
        can update the output in place without autograd copying views."""
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return self._restore_base(x, y, ())
        if self.routing.rows is not None:
            return self._routed(x, y)
        names = [n for n in self.active if n not in self.merged]
        y = self._restore_base(x, y, names)
        if not names:
            return y
        z = self.ops.without_bias(y) if any(self.adapters[n].needs_base_output for n in names) else None
        if z is y and len(names) > 1:
            z = y.clone()  # later adapters read z: keep it apart from the running output
        for name in names:
            y = self.adapters[name].add_to(y, x, z)
        return y

    def _shifts(self, running: Sequence[str]) -> Tensor | None:
        """Sum of init_delta of adapters that hold part of the base weight but do not run now, (out, in_flat)."""
        held = [a.init_delta for n, a in self.adapters.items()
                if a.init_delta is not None and n not in running and n not in self.merged]
        return sum(held[1:], held[0]) if held else None

    def _restore_base(self, x: Tensor, y: Tensor, running: Sequence[str]) -> Tensor:
        """An adapter whose init took part of the base weight (PiSSA-style, periodic merges) changes the base only
        while it runs: for every other adapter, and when disabled, the layer computes the original base."""
        shift = self._shifts(running)
        return y if shift is None else y + self._base_map(x, shift, y.dtype)

    def _base_map(self, x: Tensor, w2d: Tensor, dtype: torch.dtype) -> Tensor:
        """The layer's map with weight w2d (out, in_flat) and no bias: (..., out)."""
        return self.ops.down(self.ops.input_for(x, dtype), w2d.to(dtype).reshape(self.ops.a_shape(w2d.shape[0])))

    def _routed(self, x: Tensor, y: Tensor) -> Tensor:
        """Reference mixed-batch path: each adapter runs on the rows that asked for it (or the executor)."""
        if self.routing.executor is not None:
            return self.routing.executor(self, x, y)
        if self.merged:
            raise MergeError("adapter_names= cannot be used while adapters are merged; call unmerge first")
        groups = self.routing.groups(x.shape[0], x.device)
        y = self._restore_base(x, y, ())  # every row starts from the original base ...
        for name, idx in groups.items():  # ... and the rows of a base-shifting adapter give its part back
            delta = self.adapters[name].init_delta if name in self.adapters else None
            if delta is not None:
                y = y.index_add(0, idx, -self._base_map(x.index_select(0, idx), delta, y.dtype))
        need_z = any(self.adapters[n].needs_base_output for n in groups if n in self.adapters)
        z = self.ops.without_bias(y) if need_z else None
        for name, idx in groups.items():
            if name == BASE or name not in self.adapters:
                continue
            zi = None if z is None else z.index_select(0, idx)
            y = y.index_add(0, idx, self.adapters[name](x.index_select(0, idx), zi).to(y.dtype))
        return y

    # --- merging ----------------------------------------------------------------------------------------------
    # Each adapter merges as W' = a * (W + D) with a per-row scale a (None = 1) and a direction update D. A set
    # merges against the same W, so the merged layer computes what the unmerged forward adds up:
    #   W' = W + sum_k (a_k (W + D_k) - W) = c * W + sum_k a_k D_k,   c = 1 + sum_k (a_k - 1)
    # and unmerges as W = (W' - sum_k a_k D_k) / c with the a_k kept from merge time.
    def merge_result(self, names: Sequence[str],
                     keep: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor | None]]:
        """(merged (out, in_flat) fp32 weight, per-adapter row scales) for merging `names`; changes nothing
        except `keep`, which receives D of adapters whose D is computed from the base weight."""
        w = self.ops.weight2d().float()
        scale, offset, scales = torch.ones(w.shape[0], device=w.device), torch.zeros_like(w), {}
        for name in names:
            adapter = self.adapters[name]
            a, d = adapter.row_scale(w), adapter.delta_weight()  # (out,) or None, (out, in_flat)
            scales[name] = a
            if adapter.delta_reads_base and keep is not None:
                keep[name] = d  # D was computed from this W; unmerge must not recompute it from W'
            offset += d if a is None else a[:, None] * d
            if a is not None:
                scale += a - 1
        return scale[:, None] * w + offset, scales

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        new = self.check_merge(names)
        if not new:
            return
        if self.merged and self._reads_base([*self.merged, *new]):
            new = [*self.merged, *new]
            self.unmerge()  # re-merge the whole set against the original W
        w, scales = self.merge_result(new, keep=self._deltas)
        if safe and not torch.isfinite(w).all():
            raise NonFiniteWeightError(f"merging {new} gives NaN/Inf weights; nothing was merged")
        self.ops.set_weight2d(w)
        self._shift_bias(new, +1)
        self.merged.extend(new)
        self._scales.update(scales)

    def _reads_base(self, names: Sequence[str]) -> bool:
        return any(self.adapters[n].needs_base_output or self.adapters[n].delta_reads_base for n in names)

    def check_merge(self, names: Sequence[str], where: str = "") -> list[str]:
        """The adapters of `names` this layer would newly merge; MergeError if the merge would be wrong."""
        new = [n for n in names if n in self.adapters and n not in self.merged]
        pending = [n for n in self.active if n not in self.merged and n not in new]
        blocked = [n for n in pending if new and self._reads_base([n])]
        if blocked:
            raise MergeError(f"{where or 'layer'}: adapters {blocked} stay active and unmerged but read the base "
                             "output, which the merge would change; merge them in the same call or deactivate them")
        return new

    def unmerge(self) -> None:
        if not self.merged:
            return
        scale = torch.ones(self.ops.out_features, device=self.ops.weight.device)
        offset = torch.zeros_like(self.ops.weight2d(), dtype=torch.float32)
        for name in self.merged:
            a = self._scales.pop(name, None)
            d = self._deltas.pop(name) if name in self._deltas else self.adapters[name].delta_weight()
            offset += d if a is None else a[:, None] * d
            if a is not None:
                scale += a - 1
        self.ops.set_weight2d((self.ops.weight2d().float() - offset) / scale[:, None])
        self._shift_bias(self.merged, -1)
        self.merged.clear()

    def _shift_bias(self, names: Sequence[str], sign: int) -> None:
        bias = self.ops.bias
        for name in names:
            new_bias = self.adapters[name].merged_bias(bias, sign)
            if new_bias is not None:
                with torch.no_grad():
                    bias.copy_(new_bias)


class ModulesToSave(nn.Module):
    """A whole module with one trainable copy per adapter (`copies[name]`); the active copy runs.

    Under routing, each batch row runs through the copy of its adapter (the original for the others).
    """

    def __init__(self, original_module: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.routing = routing
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def forward(self, x: Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing.rows is not None:
            return self._routed(x, *args, **kwargs)
        module = self.copies[self.active] if self.active in self.copies else self.original_module
        return module(x, *args, **kwargs)

    def _routed(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.original_module(x, *args, **kwargs)
        for name, idx in self.routing.groups(x.shape[0], x.device).items():
            if name in self.copies:
                y = y.index_copy(0, idx, self.copies[name](x.index_select(0, idx), *args, **kwargs))
        return y
