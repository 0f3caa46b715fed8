"""The batched adapter op: many adapters' contributions in one forward, over a base output shared by every row.

One forward of a served model has ONE `RoutingPlan` (token -> (slot, weight) pairs, K pairs per token) and ONE
`Slots` table (slot -> the adapter's `LowRank` per layer), both built once per batch and read by every layer.
Per layer, `adapter_op(backend, ...)` adds to the base output y (N, out), for each token n and pair k:
    y[n] += w[n, k] * contribution(slot[n, k], x[n], z[n])
with `LowRank.contribution` the spec (d = s (B A x + bias); channel-scaled forms: out_scale * (z + d) - z).
Slot -1 means "no adapter": those tokens keep the base output bit for bit.

Back ends (every one equals `reference` on any routing; tests/serve/test_ops.py):
  reference  per-token Python loop over LowRank.contribution: obviously correct, slow.
  segment    tokens sorted by slot once per plan; one GEMM pair per contiguous segment, fused addmm_ into y.
             When the caller already groups rows by adapter (the engine does) segments are slices: no gather.
  gather     rows gathered in slot order once per plan, then per rank group ONE grouped GEMM pair
             (torch._grouped_mm over the slots' stacked factors, jagged by segment offsets): no Python loop over
             slots and no per-token copy of the factors. Where grouped GEMM cannot run (float64, factor sizes
             not 16-byte aligned) each token's factors are gathered and applied with bmm (slow; a fallback).
  auto       per layer and routing: `segment` for few segments, `gather` for many when grouped GEMM can run
             (the crossover is measured in benchmarks/serving.py; AUTO_MIN_SEGMENTS).
Mixed ranks are never padded to the largest: `gather` groups slots by rank, `segment` uses each slot's own rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.adapter import LowRank
from ..core.layers import LayerOps

__all__ = ["AUTO_MAX_SEGMENT_ROWS", "AUTO_MIN_SEGMENTS", "BACKENDS", "RoutingPlan", "Slots", "adapter_op"]

BACKENDS = ("reference", "segment", "gather", "auto")
AUTO_MIN_SEGMENTS = 3  # `auto` uses `gather` from this many segments in a pair column on ...
AUTO_MAX_SEGMENT_ROWS = 16  # ... while segments average at most this many rows (measured: benchmarks/serving.py)
PAD_WASTE = 3  # padded bmm (one kernel per factor) while the padded rows are at most this many times the real
PAD_WASTE_FALLBACK = 8  # the same where grouped GEMM cannot run (the alternative copies factors per token)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TOKEN_WISE = ("linear", "conv1d_transposed")


@dataclass
class _Segment:
    slot: int
    rows: Tensor | slice  # token indices of this slot (a slice when they are contiguous)
    weight: Tensor | None  # (n, 1) pair weights of these tokens, None = all 1


@dataclass
class _Group:
    """The tokens of one pair column that use one stack, in slot order (what `gather` needs per layer)."""

    rows: Tensor | None  # (n,) token indices; None = every token, already in slot order (no gather/scatter)
    local: Tensor  # (n,) each token's index in the stack
    members: slice | Tensor  # the stack members the grouped GEMM runs over: a range (a view) or picked (a copy)
    offs: Tensor  # (G,) int32 end offset of each of those members' segments (grouped GEMM)
    weight: Tensor | None  # (n, 1) pair weights, None = all 1
    padded_rows: int  # G * L: rows of the padded layout, L the longest segment
    _pad: tuple[Tensor, Tensor] | None = None

    def pad(self, tokens: int) -> tuple[Tensor, Tensor]:
        """The padded layout (G segments of L rows, for bmm): (G*L,) token index per padded row (padding rows
        repeat a real token; their results are dropped) and (n,) the padded position of each group row."""
        if self._pad is None:
            counts = torch.diff(self.offs, prepend=self.offs.new_zeros(1)).long()  # (G,)
            length = self.padded_rows // len(counts)
            pos = torch.arange(length, device=counts.device)  # (L,)
            valid = pos[None, :] < counts[:, None]  # (G, L)
            src = torch.where(valid, (self.offs.long() - counts)[:, None] + pos[None, :], 0).flatten()  # (G*L,)
            rows = self.rows if self.rows is not None else torch.arange(tokens, device=counts.device)
            self._pad = rows[src], torch.nonzero(valid.flatten()).squeeze(1)
        return self._pad


class RoutingPlan:
    """Token -> (slot, weight) pairs for one forward: slots (N, K) long (-1 = none), weights (N, K) or None.

    Sorting, segmentation and per-stack grouping happen once per plan (lazily, memoized) and are shared by
    every layer.
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
        self._sorted: dict[int, tuple[Tensor, Tensor, bool]] = {}
        self._groups: dict[tuple[int, tuple[int, ...]], _Group | None] = {}

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

    def sorted_column(self, k: int) -> tuple[Tensor, Tensor, bool]:
        """(order, slots in that order, whether the order is the identity) for pair column k."""
        if k not in self._sorted:
            col = self.slots[:, k]  # (N,)
            order = torch.argsort(col, stable=True)  # (N,)
            identity = bool((order == torch.arange(len(order), device=order.device)).all())
            self._sorted[k] = (order, col[order], identity)
        return self._sorted[k]

    def _column(self, k: int) -> list[_Segment]:
        order, ordered, _ = self.sorted_column(k)
        ids, counts = torch.unique_consecutive(ordered, return_counts=True)
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

    def group(self, k: int, st: _Stack) -> _Group | None:
        """The tokens of column k routed to a member of stack `st`, in slot order; None when there are none."""
        key = (k, st.members)
        if key not in self._groups:
            self._groups[key] = self._group(k, st)
        return self._groups[key]

    def _group(self, k: int, st: _Stack) -> _Group | None:
        order, ordered, identity = self.sorted_column(k)
        local = st.lookup[ordered.clamp_min(0)].masked_fill(ordered < 0, -1)  # (N,) ascending where >= 0
        keep = local >= 0
        n = int(keep.sum())
        if n == 0:
            return None
        rows = None if identity and n == len(order) else order[keep]  # (n,)
        local = local[keep]  # (n,)
        counts = torch.bincount(local, minlength=len(st.members))  # (S,)
        used = torch.nonzero(counts).squeeze(1)  # (u,)
        lo, hi = int(used[0]), int(used[-1]) + 1
        # an empty group costs about what copying one member's factors does: pick the used ones when sparse
        members = slice(lo, hi) if hi - lo <= 8 * len(used) else used
        offs = counts[members].cumsum(0).to(torch.int32)  # (G,)
        w = None if self.weights is None else self.weights[order[keep], k][:, None]  # (n, 1)
        padded = len(offs) * int(counts.max())
        return _Group(rows, local, members, offs, w, padded)


class Slots:
    """The adapters of a batch in slot order: slot i -> {layer key: LowRank} (layers it does not adapt are
    absent). Per-layer views and the stacked factors for `gather` are built per layer on first use and kept
    while this table lives (the engine keeps one while its set of adapters is unchanged, so steps reuse them)."""

    def __init__(self, per_slot: Sequence[Mapping[str, LowRank]]) -> None:
        self.per_slot = list(per_slot)
        self._layers: dict[str, tuple[list[LowRank | None], bool, bool]] = {}
        self._stacks: dict[str, list[_Stack]] = {}

    def __len__(self) -> int:
        return len(self.per_slot)

    def layer(self, key: str) -> list[LowRank | None]:
        return self._layer(key)[0]

    def _layer(self, key: str) -> tuple[list[LowRank | None], bool, bool]:
        """(LowRank or None per slot, any slot adapts the layer, any slot has a channel scale)."""
        if key not in self._layers:
            lows = [s.get(key) for s in self.per_slot]
            used = [low for low in lows if low is not None]
            self._layers[key] = (lows, bool(used), any(low.out_scale is not None for low in used))
        return self._layers[key]

    def stacks(self, key: str) -> list[_Stack]:
        if key not in self._stacks:
            self._stacks[key] = _build_stacks(self.layer(key))
        return self._stacks[key]


@dataclass
class _Stack:
    """Slots of one layer sharing one rank, stacked in slot order: at (S, in, r), bt (S, r, out), scale (S, 1)."""

    members: tuple[int, ...]  # the slots in this stack, ascending
    lookup: Tensor  # (n_slots,) long: slot -> index in this stack, -1 = not in this stack
    at: Tensor
    bt: Tensor
    scale: Tensor
    uniform_scale: float | None  # the one scale every member shares, if they do
    out_scale: Tensor | None  # (S, out), ones for slots without one
    bias: Tensor | None  # (S, out), zeros for slots without one
    grouped: bool = False  # can torch._grouped_mm run on these factors (dtype, 16-byte aligned rows)?

    def __post_init__(self) -> None:
        size, dims = self.at.element_size(), (self.at.shape[1], self.at.shape[2], self.bt.shape[2])
        self.grouped = self.at.dtype in _GROUPED_DTYPES and all(d * size % 16 == 0 for d in dims) and dims[1] > 0


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
        at = torch.stack([g.a.flatten(1).T for g in group])  # (S, in, r)
        bt = torch.stack([g.b.flatten(1).T for g in group])  # (S, r, out)
        scales = [g.scale for g in group]
        scale = torch.tensor(scales, dtype=ref.dtype, device=ref.device)[:, None]  # (S, 1)
        uniform = scales[0] if all(s == scales[0] for s in scales) else None
        one, zero = torch.ones(bt.shape[2], dtype=ref.dtype), torch.zeros(bt.shape[2], dtype=ref.dtype)
        os_ = _stack_opt([g.out_scale for g in group], one)
        bias = _stack_opt([g.bias for g in group], zero)
        out.append(_Stack(tuple(members), lookup, at, bt, scale, uniform, os_, bias))
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
    lows, used, scaled = slots._layer(key)
    if not used:
        return y
    z = None
    if scaled:
        z = ops.without_bias(y)
        z = z.clone() if z is y else z  # y changes in place below; scaled forms read the pristine z
    if backend == "reference":
        return _reference(ops, x, y, z, plan, lows)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; use one of {BACKENDS}")
    if ops.kind in _TOKEN_WISE and (backend == "gather" or backend == "auto" and _auto_grouped(plan, slots, key, x)):
        return _gather(x, y, z, plan, slots.stacks(key))
    return _segment(ops, x, y, z, plan, lows)


def _auto_grouped(plan: RoutingPlan, slots: Slots, key: str, x: Tensor) -> bool:
    """`gather` for many short segments (where grouped GEMM can run, so never its slow fallback); `segment`
    for few or long ones (slices of x and y, no copies)."""
    segments = max(len(column) for column in plan.segments())
    if segments < AUTO_MIN_SEGMENTS or plan.tokens > AUTO_MAX_SEGMENT_ROWS * segments:
        return False
    return _grouped_device(x) and all(st.grouped for st in slots.stacks(key))


def _grouped_device(x: Tensor) -> bool:
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


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
    fused = ops.kind in _TOKEN_WISE and y.dim() == 2
    for column in plan.segments():
        for seg in column:
            low = lows[seg.slot]
            if low is None:
                continue
            xs = x[seg.rows]  # (n, in): a view for contiguous rows
            h = ops.down(ops.input_for(xs, low.a.dtype), low.a)  # (n, r)
            if low.out_scale is None and low.bias is None and seg.weight is None and isinstance(seg.rows, slice):
                ys = y[seg.rows]  # (n, out) view
                if fused and ys.dtype == low.b.dtype:
                    ys.addmm_(h, low.b.T, alpha=low.scale)  # ys += s (h B^T): one GEMM into y's storage
                    continue
                got = ops.up_add_(ys, h.mul_(low.scale), low.b)  # ys += (s h) B^T
                if got is not ys:
                    y[seg.rows] = got  # the layout or dtype did not allow the in-place form
                continue
            c = _finish(ops, low, ops.up(h, low.b).mul_(low.scale), None if z is None else z[seg.rows])  # (n, out)
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
    """Per pair column and rank group: the group's rows in slot order, one grouped GEMM pair, one scatter."""
    for k in range(plan.slots.shape[1]):
        for st in stacks:
            grp = plan.group(k, st)
            if grp is None:
                continue
            d = _stack_delta(st, x, grp)  # (n, out) = s B A x per row, rows in slot order
            if st.bias is not None:
                d = d + st.scale[grp.local] * st.bias[grp.local]
            if st.out_scale is not None:
                zs = (z if grp.rows is None else z.index_select(0, grp.rows)).to(d.dtype)  # (n, out)
                d = torch.addcmul(-zs, zs + d, st.out_scale[grp.local])
            if grp.weight is not None:
                d = d * grp.weight
            if grp.rows is None:
                y.add_(d.to(y.dtype))
            else:
                y.index_add_(0, grp.rows, d.to(y.dtype))
    return y


def _stack_delta(st: _Stack, x: Tensor, grp: _Group) -> Tensor:
    """(N, in) layer input -> (n, out) s B A x for the group's rows in slot order, each with its own slot's
    factors: padded bmm when padding wastes little (fewest kernels), else grouped GEMM, else per-token bmm."""
    grouped = st.grouped and _grouped_device(x)
    n = len(grp.local)
    if grp.padded_rows <= (PAD_WASTE if grouped else PAD_WASTE_FALLBACK) * n:
        src, real = grp.pad(x.shape[0])
        at, bt = st.at[grp.members], st.bt[grp.members]  # (G, in, r), (G, r, out)
        xp = x.index_select(0, src).to(at.dtype).view(at.shape[0], -1, at.shape[1])  # (G, L, in)
        h = torch.bmm(xp, at)  # (G, L, r)
        h = h.mul_(st.uniform_scale if st.uniform_scale is not None else st.scale[grp.members][:, :, None])
        return torch.bmm(h, bt).flatten(0, 1).index_select(0, real)  # (n, out) from (G, L, out)
    xs = (x if grp.rows is None else x.index_select(0, grp.rows)).to(st.at.dtype)  # (n, in) in slot order
    scale = st.uniform_scale if st.uniform_scale is not None else st.scale[grp.local]  # float or (n, 1)
    if grouped:
        at, bt = st.at[grp.members], st.bt[grp.members]  # (G, in, r), (G, r, out)
        h = torch._grouped_mm(xs.contiguous(), at, offs=grp.offs).mul_(scale)  # (n, r): per segment x A^T
        return torch._grouped_mm(h, bt, offs=grp.offs)  # (n, out): per segment h B^T
    h = torch.bmm(xs[:, None, :], st.at[grp.local]).squeeze(1) * scale  # (n, r): factors gathered per token
    return torch.bmm(h[:, None, :], st.bt[grp.local]).squeeze(1)  # (n, out)
