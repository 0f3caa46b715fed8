"""TriAdaptLoRA (spec 1.34, reconstructed): the triangular packing of T, identity at init, the forward and merge
against a slow twin, the factored Frobenius importance, the linear threshold, function-preserving growth driven by a
real optimizer (ranks non-decreasing, the budget respected, only modules above tau grow), save -> load after growth,
config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError, UnsupportedLayerError, load_adapter, save_adapter
from peftkit.methods.rank_budget import linear_schedule
from peftkit.methods.triadaptlora import TriAdaptLoraAdapter, TriAdaptLoraConfig, tri_matrix

from ._helpers import close, logits, perturb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _model(**cfg) -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(Net().eval())
    model.add_adapter("default", TriAdaptLoraConfig(target_modules=["fc1", "fc2", "fc3"], **cfg))
    return model


def _adapters(model: AdapterModel) -> dict[str, TriAdaptLoraAdapter]:
    return {p: h.adapters["default"] for p, h in model.hosts() if hasattr(h, "adapters")}


def _step(model: AdapterModel, opt: torch.optim.Optimizer, step: int) -> bool:
    model.train()
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(step))
    model(x).square().mean().backward()
    opt.step()
    changed = model.step_hook(step, opt)
    opt.zero_grad()
    model.eval()
    return changed


def _dense_T(lower: torch.Tensor, upper: torch.Tensor, r: int) -> torch.Tensor:
    t = torch.zeros(r, r)
    it = iter(lower.tolist())
    for i in range(r):
        for j in range(i + 1):
            t[i, j] = next(it)
    it = iter(upper.tolist())
    for j in range(r):
        for i in range(j):
            t[i, j] = next(it)
    return t


def test_triangular_packing_appends_cleanly() -> None:
    g = torch.Generator().manual_seed(0)
    lower, upper = torch.randn(10, generator=g), torch.randn(6, generator=g)  # r = 4
    assert torch.equal(tri_matrix(lower, upper, 4), _dense_T(lower, upper, 4))
    assert torch.equal(tri_matrix(lower[:6], upper[:3], 3), tri_matrix(lower, upper, 4)[:3, :3])


def test_identity_at_init_forward_twin_and_merge() -> None:
    model = _model(r=3, lora_alpha=6)
    x = torch.randn(5, 12)
    with model.disabled():
        base = logits(model, x)
    assert torch.equal(logits(model, x), base)
    a = _adapters(model)["fc1"]
    assert torch.equal(a.core(), torch.eye(3))
    perturb(model.named_parameters(), seed=1)
    with torch.no_grad():
        t = _dense_T(a.lora_T_lower[0], a.lora_T_upper[0], 3)
        twin = 2.0 * (x @ a.lora_A[0].T @ t.T @ a.lora_B[0].T)  # s = alpha / r = 2
        assert close(a(x, None), twin)
        assert close(a.delta_weight(), 2.0 * a.lora_B[0] @ t @ a.lora_A[0])
        assert math.isclose(a.frobenius(), float(a.delta_weight().norm() / math.sqrt(16 * 12)), rel_tol=1e-5)
    out = logits(model, x)
    model.merge()
    assert close(logits(model, x), out)


def test_linear_threshold_schedule() -> None:
    assert [linear_schedule(t, 1.0, 2.0, 10, 10, 50) for t in (0, 10, 25, 40, 50)] == [1.0, 1.0, 1.5, 2.0, 2.0]


def test_growth_preserves_output_respects_budget_and_threshold() -> None:
    model = _model(r=1, target_rank=3, deltaT=2, total_step=20, tau_start=0.9, tau_end=1.2)
    layers = list(_adapters(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ranks = [[a.rank for a in layers]]
    for step in range(1, 21):
        _step(model, opt, step)
        ranks.append([a.rank for a in layers])
        grown = [r2 > r1 for r1, r2 in zip(ranks[-2], ranks[-1], strict=True)]
        tau = linear_schedule(step, 0.9, 1.2, 0, 0, 20)
        if any(grown):  # only at deltaT steps, only modules above tau(t)
            assert step % 2 == 0 and all(a.ema > tau for a, g in zip(layers, grown, strict=True) if g)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
    steps = zip(ranks, ranks[1:], strict=False)
    assert all(r2 >= r1 for a, b in steps for r1, r2 in zip(a, b, strict=True))
    assert all(sum(r) <= 3 * 3 for r in ranks) and sum(ranks[-1]) > 3


def test_grow_is_function_preserving() -> None:
    model = _model(r=2)
    perturb(model.named_parameters(), seed=4)
    a = _adapters(model)["fc2"]
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = a(x, None)
        a.grow()
        assert a.rank == 3 and a.core().shape == (3, 3)
        assert close(a(x, None), before)
        assert [p.shape for p in a.lora_T_lower] == [(3,), (3,)] and [p.shape for p in a.lora_T_upper] == [(1,), (2,)]


def test_save_load_after_growth(tmp_path) -> None:
    model = _model(r=1, target_rank=3, deltaT=2, total_step=20, tau_start=0.9, tau_end=1.2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 9):
        _step(model, opt, step)
    ranks = {p: a.rank for p, a in _adapters(model).items()}
    assert sum(ranks.values()) > 3
    x = torch.randn(5, 12)
    out = logits(model, x)
    save_adapter(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern == {p: r for p, r in ranks.items() if r != 1}
    torch.manual_seed(0)
    loaded = AdapterModel(Net().eval())
    load_adapter(loaded, tmp_path)
    assert {p: a.rank for p, a in _adapters(loaded).items()} == ranks
    assert torch.equal(logits(loaded, x), out)


def test_config_errors_name_the_field() -> None:
    bad = [({"r": 0}, "r"), ({"r": 4, "target_rank": 3}, "target_rank"), ({"tinit": 1000}, "tinit"),
           ({"deltaT": 0}, "deltaT"), ({"tau_start": 2.0, "tau_end": 1.0}, "tau_end"), ({"beta": 1.5}, "beta"),
           ({"rank_pattern": {"fc1": -1}}, "rank_pattern['fc1']"), ({"total_step": 0}, "total_step")]
    for fields, name in bad:
        with pytest.raises(ConfigError) as info:
            TriAdaptLoraConfig(target_modules=["fc1"], **fields)
        assert info.value.field == name, fields
    with pytest.raises(UnsupportedLayerError):
        AdapterModel(nn.Sequential(nn.Conv2d(3, 4, 3))).add_adapter("d", TriAdaptLoraConfig(target_modules=["0"]))
