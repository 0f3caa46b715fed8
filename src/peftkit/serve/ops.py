"""The batched adapter op: many adapters' contributions in one forward, over a base output shared by every row.

One forward of a served model has ONE `RoutingPlan` (token -> (slot, weight) pairs, K pairs per token) and ONE
`Slots` table (slot -> the adapter's `LowRank` per layer), both built once per batch and read by every layer.
Per layer, `adapter_op(backend, ...)` adds to the base output y (N, out), for each token n and pair k:
    y[n] += w[n, k] * contribution(slot[n, k], x[n], z[n])
with `LowRank.contribution` the spec (d = s (B A x + bias); channel-scaled forms: out_scale * (z + d) - z).
Slot -1 means "no adapter": those tokens keep the base output bit for bit.

Back ends (every one equals `reference` on any routing; tests/serve/test_ops.py):
  reference  per-token Python loop over LowRank.contribution: obviously correct, slow.
  segment    tokens sorted by slot once per plan; one GEMM pair per contiguous segment (the default). When the
             caller already groups rows by adapter (the engine does) segments are slices: no gather at all.
  gather     per rank group, per-token factors gathered from stacked slots and applied with bmm: one kernel
             pair per distinct rank, whatever the number of adapters (many tiny segments, decode).
Mixed ranks are never padded to the largest: `gather` groups slots by rank, `segment` uses each slot's own rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.adapter import LowRank
from ..core.layers import LayerOps

__all__ = ["BACKENDS", "RoutingPlan", "Slots", "adapter_op"]

BACKENDS = ("reference", "segment", "gather")


@dataclass
class _Segment:
    slot: int
    rows: Tensor | slice  # token indices of this slot (a slice when they are contiguous)
    weight: Tensor | None  # (n, 1) pair weights of these tokens, None = all 1


class RoutingPlan:
    """Token -> (slot, weight) pairs for one forward: slots (N, K) long (-1 = none), weights (N, K) or None.

    Sorting and segmentation happen once per plan (lazily, memoized) and are shared by every layer.
    """

    def __init__(self, slots: Tensor, weights: Tensor | None = None) -> None:
        if slots.dim() == 1:
            slots = slots[:, None]  # (N, 1)
        if weights is not None and weights.dim() == 1:
            weights = weights[:, None]
        if weights is not None and weights.shape != slots.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must match slots {tuple(slots.shape)}")
        self.slots, self.weights = slots.long(), weights
        self._segments: list[list[_Segment]] | None = None

    @classmethod
    def from_rows(cls, row_slots: Sequence[int], tokens_per_row: int, device: torch.device | None = None
                  ) -> RoutingPlan:
        """One adapter slot per batch row, repeated over the row's tokens ((B, T) flattened row-major)."""
        rows = torch.tensor(list(row_slots), dtype=torch.long, device=device)
        return cls(rows.repeat_interleave(tokens_per_row))

    @property
    def tokens(self) -> int:
        return self.slots.shape[0]

    def segments(self) -> list[list[_Segment]]:
        """Per pair column k: the segments of tokens sharing a slot (slot -1 left out)."""
        if self._segments is None:
            self._segments = [self._column(k) for k in range(self.slots.shape[1])]
        return self._segments

    def _column(self, k: int) -> list[_Segment]:
        col = self.slots[:, k]  # (N,)
        order = torch.argsort(col, stable=True)  # (N,)
        ids, counts = torch.unique_consecutive(col[order], return_counts=True)
        out, start = [], 0
        for slot, n in zip(ids.tolist(), counts.tolist(), strict=True):
            idx = order[start:start + n]
            start += n
            if slot < 0:
                continue
            first = int(idx[0])
            rows = slice(first, first + n) if int(idx[-1]) == first + n - 1 else idx  # sorted & consecutive
            w = None if self.weights is None else self.weights[idx, k][:, None]  # (n, 1)
            out.append(_Segment(slot, rows, w))
        return out


class Slots:
    """The adapters of a batch in slot order: slot i -> {layer key: LowRank} (layers it does not adapt are
    absent). Stacked factors for `gather` are built per (layer, rank) on first use and kept while this table
    lives (the engine keeps one while its set of adapters is unchanged, so decode steps reuse them)."""

    def __init__(self, per_slot: Sequence[Mapping[str, LowRank]]) -> None:
        self.per_slot = list(per_slot)
        self._stacks: dict[str, list[_Stack]] = {}

    def __len__(self) -> int:
        return len(self.per_slot)

    def layer(self, key: str) -> list[LowRank | None]:
        return [s.get(key) for s in self.per_slot]

    def stacks(self, key: str) -> list[_Stack]:
        if key not in self._stacks:
            self._stacks[key] = _build_stacks(self.layer(key))
        return self._stacks[key]


@dataclass
class _Stack:
    """Slots of one layer sharing one rank, stacked: a (S, r, in), b (S, out, r), scale (S, 1)."""

    lookup: Tensor  # (n_slots,) long: slot -> index in this stack, -1 = not in this stack
    a: Tensor
    b: Tensor
    scale: Tensor
    out_scale: Tensor | None  # (S, out), ones for slots without one
    bias: Tensor | None  # (S, out), zeros for slots without one


def _build_stacks(lows: list[LowRank | None]) -> list[_Stack]:
    by_rank: dict[int, list[int]] = {}
    for i, low in enumerate(lows):
        if low is not None:
            by_rank.setdefault(low.rank, []).append(i)
    out = []
    for members in by_rank.values():
        group = [lows[i] for i in members]
        ref = group[0].b
        lookup = torch.full((len(lows),), -1, dtype=torch.long, device=ref.device)
        lookup[members] = torch.arange(len(members), device=ref.device)
        a = torch.stack([g.a.flatten(1) for g in group])  # (S, r, in)
        b = torch.stack([g.b.flatten(1) for g in group])  # (S, out, r)
        scale = torch.tensor([g.scale for g in group], dtype=ref.dtype, device=ref.device)[:, None]  # (S, 1)
        one, zero = torch.ones(b.shape[1], dtype=ref.dtype), torch.zeros(b.shape[1], dtype=ref.dtype)
        os_ = _stack_opt([g.out_scale for g in group], one)
        bias = _stack_opt([g.bias for g in group], zero)
        out.append(_Stack(lookup, a, b, scale, os_, bias))
    return out


def _stack_opt(vectors: list[Tensor | None], fill: Tensor) -> Tensor | None:
    if all(v is None for v in vectors):
        return None
    return torch.stack([fill.to(next(u for u in vectors if u is not None)) if v is None else v.reshape(-1)
                        for v in vectors])  # (S, out)


# --- the op ---------------------------------------------------------------------------------------------------
def adapter_op(backend: str, ops: LayerOps, key: str, x: Tensor, y: Tensor, plan: RoutingPlan, slots: Slots
               ) -> Tensor:
    """y (N, out) plus every routed contribution for layer `key`; x (N, in) is the layer input. y may be
    updated in place (it is the fresh base output)."""
    lows = slots.layer(key)
    if all(low is None for low in lows):
        return y
    z = None
    if any(low is not None and low.out_scale is not None for low in lows):
        z = ops.without_bias(y)
        z = z.clone() if z is y else z  # y changes in place below; scaled forms read the pristine z
    if backend == "reference":
        return _reference(ops, x, y, z, plan, lows)
    if backend == "gather" and ops.kind in ("linear", "conv1d_transposed"):
        return _gather(x, y, z, plan, slots.stacks(key))
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; use one of {BACKENDS}")
    return _segment(ops, x, y, z, plan, lows)


def _reference(ops: LayerOps, x: Tensor, y: Tensor, z: Tensor | None, plan: RoutingPlan,
               lows: list[LowRank | None]) -> Tensor:
    """Per token, per pair: y[n] += w * LowRank.contribution(x[n], z[n])."""
    out = y.clone()
    for n in range(plan.tokens):
        for k in range(plan.slots.shape[1]):
            slot = int(plan.slots[n, k])
            if slot < 0 or lows[slot] is None:
                continue
            zn = None if z is None else z[n:n + 1]
            c = lows[slot].contribution(ops, x[n:n + 1], zn)[0]  # (out,)
            w = 1.0 if plan.weights is None else plan.weights[n, k]
            out[n] += (w * c).to(out.dtype)
    return out


def _segment(ops: LayerOps, x: Tensor, y: Tensor, z: Tensor | None, plan: RoutingPlan,
             lows: list[LowRank | None]) -> Tensor:
    for column in plan.segments():
        for seg in column:
            low = lows[seg.slot]
            if low is None:
                continue
            xs = x[seg.rows]  # (n, in): a view for contiguous rows
            h = ops.down(ops.input_for(xs, low.a.dtype), low.a) * low.scale  # (n, r)
            if low.out_scale is None and low.bias is None and seg.weight is None and isinstance(seg.rows, slice):
                ys = y[seg.rows]  # (n, out) view
                got = ops.up_add_(ys, h, low.b)  # ys += h B^T, one fused GEMM into y's storage
                if got is not ys:
                    y[seg.rows] = got  # the layout or dtype did not allow the in-place form
                continue
            c = _finish(ops, low, ops.up(h, low.b), None if z is None else z[seg.rows])  # (n, out)
            if seg.weight is not None:
                c = c * seg.weight
            if isinstance(seg.rows, slice):
                y[seg.rows] += c.to(y.dtype)
            else:
                y.index_add_(0, seg.rows, c.to(y.dtype))
    return y


def _finish(ops: LayerOps, low: LowRank, d: Tensor, z: Tensor | None) -> Tensor:
    """From d = s B A x to the contribution: + s bias, then the channel scale."""
    if low.bias is not None:
        d = d + low.scale * ops.channel(low.bias).to(d.dtype)
    if low.out_scale is None:
        return d
    zs = z.to(d.dtype)  # (n, out)
    return torch.addcmul(-zs, zs + d, ops.channel(low.out_scale).to(d.dtype))


def _gather(x: Tensor, y: Tensor, z: Tensor | None, plan: RoutingPlan, stacks: list[_Stack]) -> Tensor:
    """Per rank group: gather each token's factors and apply them with two bmm (no Python loop over slots)."""
    for k in range(plan.slots.shape[1]):
        col = plan.slots[:, k]  # (N,)
        for st in stacks:
            local = st.lookup[col.clamp_min(0)].masked_fill(col < 0, -1)  # (N,)
            rows = torch.nonzero(local >= 0).squeeze(1)  # (n,)
            if rows.numel() == 0:
                continue
            sel = local[rows]  # (n,)
            xs = x.index_select(0, rows).to(st.a.dtype)  # (n, in)
            h = torch.bmm(st.a[sel], xs[:, :, None]).squeeze(2) * st.scale[sel]  # (n, r)
            d = torch.bmm(st.b[sel], h[:, :, None]).squeeze(2)  # (n, out)
            if st.bias is not None:
                d = d + st.scale[sel] * st.bias[sel]
            if st.out_scale is not None:
                zs = z.index_select(0, rows).to(d.dtype)  # (n, out)
                d = torch.addcmul(-zs, zs + d, st.out_scale[sel])
            if plan.weights is not None:
                d = d * plan.weights[rows, k][:, None]
            y.index_add_(0, rows, d.to(y.dtype))
    return y
