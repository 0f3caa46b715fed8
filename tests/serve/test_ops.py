"""Every back end of the batched adapter op equals the per-token reference on random routings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.core.adapter import LowRank
from peftkit.core.layers import ops_for
from peftkit.serve import ops as ops_mod
from peftkit.serve.ops import BACKENDS, RoutingPlan, Slots, adapter_op
from peftkit.serve.workloads import WORKLOADS, sample_adapters

IN, OUT = 12, 10


def _low(g: torch.Generator, r: int, kind: str, dtype=torch.float64) -> LowRank:
    a = torch.randn(r, IN, generator=g, dtype=dtype)
    b = torch.randn(OUT, r, generator=g, dtype=dtype)
    scale = float(torch.rand((), generator=g)) + 0.5
    if kind == "dora":
        return LowRank(a, b, scale, out_scale=torch.rand(OUT, generator=g, dtype=dtype) + 0.5)
    if kind == "bias":
        return LowRank(a, b, scale, bias=torch.randn(OUT, generator=g, dtype=dtype))
    if kind == "ia3":  # rank 0, output scaling only
        return LowRank(a[:0], b[:, :0], 1.0, out_scale=torch.rand(OUT, generator=g, dtype=dtype) + 0.5)
    return LowRank(a, b, scale)


def _slots(g: torch.Generator, n: int, kinds=("lora",), ranks=(2, 4, 8), skip_layer: int | None = None) -> Slots:
    per_slot = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        low = _low(g, ranks[i % len(ranks)], kind)
        per_slot.append({} if i == skip_layer else {"layer": low})
    return Slots(per_slot)


def _layer(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=bias).double()


def _run(backend, layer, x, plan, slots):
    ops = ops_for(layer)
    with torch.no_grad():
        return adapter_op(backend, ops, "layer", x, layer(x), plan, slots)


def _check_all(layer, x, plan, slots):
    expected = _run("reference", layer, x, plan, slots)
    for backend in BACKENDS[1:]:
        got = _run(backend, layer, x, plan, slots)
        assert (got - expected).abs().max() <= 1e-10, backend
    return expected


@pytest.fixture(params=["padded", "per-token"])
def fallback_path(request, monkeypatch):
    """Where grouped GEMM cannot run (float64 here), `gather` pads segments for bmm or gathers per token."""
    monkeypatch.setattr(ops_mod, "PAD_WASTE_FALLBACK", 10 ** 9 if request.param == "padded" else 0)
    return request.param


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("kinds", [("lora",), ("lora", "dora", "bias", "ia3")])
def test_backends_equal_reference_on_workloads(workload, kinds, fallback_path):
    g = torch.Generator().manual_seed(1)
    n_adapters, tokens = 6, 24
    slots = _slots(g, n_adapters, kinds)
    rows = sample_adapters(workload, tokens, n_adapters, g)
    rows = [r if i % 5 else -1 for i, r in enumerate(rows)]  # some base rows
    x = torch.randn(tokens, IN, generator=g, dtype=torch.float64)
    out = _check_all(_layer(), x, RoutingPlan(torch.tensor(rows)), slots)
    base = _layer()(x)
    for i, r in enumerate(rows):
        if r < 0:
            assert torch.equal(out[i], base[i].detach()), "base rows must stay bit-identical"


@pytest.mark.parametrize("bias", [True, False])
def test_weighted_pairs_per_token(bias, fallback_path):
    """K adapters per token with weights (fusion, mixtures): the weighted sum of contributions."""
    g = torch.Generator().manual_seed(2)
    slots = _slots(g, 5, ("lora", "dora"))
    tokens = 16
    pairs = torch.randint(-1, 5, (tokens, 3), generator=g)
    weights = torch.rand(tokens, 3, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, IN, generator=g, dtype=torch.float64)
    out = _check_all(_layer(bias), x, RoutingPlan(pairs, weights), slots)
    # the reference itself: weighted sum of single-adapter outputs minus the shared base
    layer = _layer(bias)
    base = layer(x).detach()
    manual = base.clone()
    for k in range(3):
        single = _run("reference", layer, x, RoutingPlan(pairs[:, k]), slots)
        manual += weights[:, k:k + 1] * (single - base)
    torch.testing.assert_close(out, manual, atol=1e-10, rtol=1e-10)


def test_contiguous_rows_use_slices_and_match():
    """Rows grouped by adapter (as the engine orders them) give slice segments: no gather, same values."""
    g = torch.Generator().manual_seed(3)
    slots = _slots(g, 3)
    plan = RoutingPlan.from_rows([0, 0, 1, 2, 2, -1], tokens_per_row=4)
    kinds = [type(s.rows) for s in plan.segments()[0]]
    assert kinds == [slice, slice, slice]
    _check_all(_layer(), torch.randn(24, IN, generator=g, dtype=torch.float64), plan, slots)


def test_layer_not_adapted_by_a_slot_is_left_alone():
    g = torch.Generator().manual_seed(4)
    slots = _slots(g, 3, skip_layer=1)
    x = torch.randn(9, IN, generator=g, dtype=torch.float64)
    plan = RoutingPlan(torch.tensor([1, 1, 1, 0, 0, 2, 2, 1, -1]))
    out = _check_all(_layer(), x, plan, slots)
    base = _layer()(x).detach()
    assert torch.equal(out[[0, 1, 2, 7, 8]], base[[0, 1, 2, 7, 8]])


def test_reference_matches_unbatched_contribution():
    """The reference is LowRank.contribution row by row: one adapter on every row equals the direct formula."""
    g = torch.Generator().manual_seed(5)
    slots = _slots(g, 1, ("dora",))
    layer = _layer()
    x = torch.randn(7, IN, generator=g, dtype=torch.float64)
    out = _run("reference", layer, x, RoutingPlan(torch.zeros(7, dtype=torch.long)), slots)
    ops = ops_for(layer)
    y = layer(x).detach()
    low = slots.layer("layer")[0]
    torch.testing.assert_close(out, y + low.contribution(ops, x, ops.without_bias(y)), atol=1e-12, rtol=1e-12)


def test_float32_and_unknown_backend():
    g = torch.Generator().manual_seed(6)
    layer = nn.Linear(IN, OUT)
    lows = [LowRank(torch.randn(4, IN, generator=g), torch.randn(OUT, 4, generator=g), 0.5) for _ in range(4)]
    slots = Slots([{"layer": low} for low in lows])
    x = torch.randn(20, IN, generator=g)
    plan = RoutingPlan(torch.randint(-1, 4, (20,), generator=g))
    ref = _run("reference", layer, x, plan, slots)
    for backend in ("segment", "gather"):
        torch.testing.assert_close(_run(backend, layer, x, plan, slots), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend 'fast' is unknown"):
        _run("fast", layer, x, plan, slots)


# --- the grouped GEMM path of `gather` (float32, 16-byte aligned factors) ---------------------------------------
A_IN, A_OUT = 16, 24  # multiples of 4 float32: torch._grouped_mm runs


def _aligned_slots(g: torch.Generator, n: int, kinds=("lora",), ranks=(4, 8, 16), scales=None) -> Slots:
    per_slot = []
    for i in range(n):
        r, kind = ranks[i % len(ranks)], kinds[i % len(kinds)]
        a, b = torch.randn(r, A_IN, generator=g), torch.randn(A_OUT, r, generator=g)
        scale = scales[i % len(scales)] if scales else float(torch.rand((), generator=g)) + 0.5
        extra = {"out_scale": torch.rand(A_OUT, generator=g) + 0.5} if kind == "dora" else {}
        extra |= {"bias": torch.randn(A_OUT, generator=g)} if kind == "bias" else {}
        per_slot.append({"layer": LowRank(a, b, scale, **extra)})
    return Slots(per_slot)


@pytest.fixture(params=["grouped", "padded"])
def fast_path(request, monkeypatch):
    """Where grouped GEMM can run, `gather` uses it or, when padding wastes little, a padded bmm."""
    monkeypatch.setattr(ops_mod, "PAD_WASTE", 0 if request.param == "grouped" else 10 ** 9)
    return request.param


def _count_grouped(monkeypatch) -> list[int]:
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("kinds", [("lora",), ("lora", "dora", "bias")])
@pytest.mark.parametrize("scales", [None, (2.0,)])
def test_grouped_gemm_path_equals_reference(monkeypatch, workload, kinds, scales, fast_path):
    """Mixed ranks (one grouped GEMM pair per rank), base rows, shuffled routing, sparse slot use."""
    g = torch.Generator().manual_seed(7)
    slots = _aligned_slots(g, 40, kinds, scales=scales)
    rows = sample_adapters(workload, 64, 40 if workload == "distinct" else 9, g)
    rows = [r if i % 7 else -1 for i, r in enumerate(rows)]
    layer = nn.Linear(A_IN, A_OUT)
    x = torch.randn(64, A_IN, generator=g)
    plan = RoutingPlan(torch.tensor(rows))
    ref = _run("reference", layer, x, plan, slots)
    calls = _count_grouped(monkeypatch)
    for backend in ("gather", "auto", "segment"):
        torch.testing.assert_close(_run(backend, layer, x, plan, slots), ref, atol=1e-4, rtol=1e-5)
    assert bool(calls) == (fast_path == "grouped"), "the grouped GEMM path must run exactly when chosen"


def test_grouped_gemm_weighted_pairs_and_grouped_rows(monkeypatch, fast_path):
    g = torch.Generator().manual_seed(8)
    slots = _aligned_slots(g, 6, ("lora", "dora"))
    layer = nn.Linear(A_IN, A_OUT)
    x = torch.randn(20, A_IN, generator=g)
    calls = _count_grouped(monkeypatch)
    for plan in (RoutingPlan(torch.randint(-1, 6, (20, 3), generator=g), torch.rand(20, 3, generator=g)),
                 RoutingPlan.from_rows([0, 1, 2, 3, 4], tokens_per_row=4)):  # identity order: no gather/scatter
        ref = _run("reference", layer, x, plan, slots)
        torch.testing.assert_close(_run("gather", layer, x, plan, slots), ref, atol=1e-4, rtol=1e-5)
    assert bool(calls) == (fast_path == "grouped")


@pytest.mark.parametrize("rows, expected", [
    ([1] * 6 + [2] * 6, "segment"),  # few segments
    (list(range(4)) * 3, "gather"),  # many short segments (decode with distinct adapters)
    (sorted(list(range(4)) * 20), "segment"),  # many long segments (prefill)
])
def test_auto_picks_by_segment_count_and_length(monkeypatch, rows, expected):
    g = torch.Generator().manual_seed(9)
    slots = _aligned_slots(g, 4)
    layer = nn.Linear(A_IN, A_OUT)
    x = torch.randn(len(rows), A_IN, generator=g)
    plan = RoutingPlan(torch.tensor(rows))
    ref = _run("reference", layer, x, plan, slots)
    used = []
    for name in ("_segment", "_gather"):
        real = getattr(ops_mod, name)
        monkeypatch.setattr(ops_mod, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    torch.testing.assert_close(_run("auto", layer, x, plan, slots), ref, atol=1e-4, rtol=1e-5)
    assert used == [f"_{expected}"]


def test_grouped_gemm_over_sparse_slot_use(monkeypatch, fast_path):
    """Few used slots far apart in a big table: the grouped GEMM runs over the used members only."""
    g = torch.Generator().manual_seed(10)
    slots = _aligned_slots(g, 40, ranks=(8,))
    layer = nn.Linear(A_IN, A_OUT)
    x = torch.randn(10, A_IN, generator=g)
    plan = RoutingPlan(torch.tensor([39, 0, 39, -1, 0, 0, 39, 20, 20, 39]))
    calls = _count_grouped(monkeypatch)
    got = _run("gather", layer, x, plan, slots)
    torch.testing.assert_close(got, _run("reference", layer, x, plan, slots), atol=1e-4, rtol=1e-5)
    assert bool(calls) == (fast_path == "grouped")
    assert isinstance(plan.group(0, slots.stacks("layer")[0]).members, torch.Tensor)
