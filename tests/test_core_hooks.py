"""The core hooks methods build on: calibration statistics, base shifts, optimizer-state resets, output losses.

Checked with LoRA (the reference method) and class attributes patched for the test, so no other method is named.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, Calibration, ConfigError
from peftkit.core.calibrate import collect
from peftkit.core.host import AdaptedLayer
from peftkit.core.layers import ops_for
from peftkit.methods.lora import LoraAdapter


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _batches(n: int = 3, rows: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(rows, 5, generator=g), "t": torch.randn(rows, 3, generator=g)} for _ in range(n)]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["t"]).square().sum()


def test_grad_statistic_is_the_mean_gradient() -> None:
    model, batches = _mlp(), _batches()
    model.requires_grad_(False)
    model[2].bias.requires_grad_(True)  # a trainable parameter elsewhere keeps its flag and gets no gradient
    layers = {"0": ops_for(model[0]), "2": ops_for(model[2])}
    stats = collect(model, layers, {"grad"}, Calibration(batches, _loss))
    w0, w2 = model[0].weight, model[2].weight
    expected = {"0": torch.zeros_like(w0), "2": torch.zeros_like(w2)}
    for b in batches:  # closed form: L = sum (W2 tanh(W1 x + b1) + b2 - t)^2
        h = torch.tanh(b["x"] @ w0.T + model[0].bias)  # (N, 4)
        e = 2 * (h @ w2.T + model[2].bias - b["t"])  # (N, 3) dL/dy
        expected["2"] += e.T @ h
        expected["0"] += ((e @ w2) * (1 - h**2)).T @ b["x"]
    for path in ("0", "2"):
        torch.testing.assert_close(stats[path]["grad"], expected[path].detach() / len(batches))
    assert [p.requires_grad for p in model.parameters()] == [False, False, False, True], "flags restored"
    assert all(p.grad is None for p in model.parameters()), "no gradient is left behind"


def test_grad_statistic_of_a_transposed_layer_is_out_by_in() -> None:
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(3, 5)  # weight (in=5, out=3)
    stats = collect(conv, {"": ops_for(conv)}, {"grad"},
                    Calibration([{"x": torch.ones(2, 5)}], lambda m, b: m(b["x"]).sum()))
    torch.testing.assert_close(stats[""]["grad"], torch.full((3, 5), 2.0))


def test_covariance_statistics() -> None:
    model, batches = _mlp(), _batches()
    stats = collect(model, {"0": ops_for(model[0])}, {"input_cov", "output_cov"}, Calibration(batches, _loss))
    x = torch.cat([b["x"] for b in batches])  # (18, 5)
    y = x @ model[0].weight.detach().T  # (18, 4), the base output without bias
    torch.testing.assert_close(stats["0"]["input_cov"], x.T @ x / len(x))
    torch.testing.assert_close(stats["0"]["output_cov"], y.T @ y / len(x))
    assert int(stats["0"]["count"]) == len(x)


def test_unknown_statistic_and_empty_data_are_refused() -> None:
    model = _mlp()
    with pytest.raises(ConfigError, match="calibration"):
        collect(model, {"0": ops_for(model[0])}, {"hessian"}, Calibration(_batches(), _loss))
    with pytest.raises(peftkit.DataError, match="no batches"):
        collect(model, {"0": ops_for(model[0])}, {"grad"}, Calibration([], _loss))


def test_data_driven_init_needs_calibration_and_receives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(LoraAdapter, "calibration", frozenset({"input_cov"}))
    monkeypatch.setattr(LoraAdapter, "calibrate", lambda self, stats: seen.setdefault(id(self), stats))
    model = AdapterModel(_mlp())
    config = peftkit.LoraConfig(target_modules=["0", "2"], r=2)
    with pytest.raises(ConfigError, match="calibration"):
        model.add_adapter("a", config)
    assert not model.configs and not any(isinstance(m, AdaptedLayer) for m in model.modules()), "nothing changed"
    model.add_adapter("a", config, calibration=Calibration(_batches(), _loss))
    assert len(seen) == 2 and all(s["input_cov"].shape[0] == s["input_cov"].shape[1] for s in seen.values())


def test_shift_base_is_undone_by_delete() -> None:
    model = AdapterModel(_mlp())
    model.add_adapter("a", peftkit.LoraConfig(target_modules=["0"], r=2))
    host = model.model[0]
    before = host.ops.weight2d().detach().clone()
    delta = torch.randn(4, 5)
    host.adapters["a"].shift_base(delta)
    host.adapters["a"].shift_base(delta)
    torch.testing.assert_close(host.ops.weight2d(), before + 2 * delta)
    model.delete_adapter("a")
    torch.testing.assert_close(model.model[0].weight, before, atol=1e-6, rtol=0)


def test_step_hook_drops_optimizer_state_of_reset_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    model = AdapterModel(_mlp())
    model.add_adapter("a", peftkit.LoraConfig(target_modules=["0", "2"], r=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, _batches()[0]).backward()
    opt.step()
    reset = model.model[0].adapters["a"].lora_B
    monkeypatch.setattr(LoraAdapter, "on_step", lambda self, step: [self.lora_B] if self.lora_B is reset else None)
    model.step_hook(1, opt)
    assert reset not in opt.state and model.model[2].adapters["a"].lora_B in opt.state


def test_output_losses_without_declaring_methods_are_empty() -> None:
    model = AdapterModel(_mlp())
    model.add_adapter("a", peftkit.LoraConfig(target_modules=["0"], r=2))
    called = []
    assert model.output_losses(torch.randn(2, 3), reference=lambda: called.append(1)) == {}
    assert not called, "the reference forward only runs for methods that need it"
    assert not model.has_output_losses() and not model.needs_reference_output()


def test_step_hook_syncs_grown_parameters_into_their_group_in_model_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank growth adds parameters: they join the optimizer group of their learning-rate multiplier, and every group
    keeps model order, so a fresh optimizer built from the grown model (a resumed run) lines up with this one."""
    model = AdapterModel(_mlp())
    model.add_adapter("a", peftkit.LoraConfig(target_modules=["0", "2"], r=2))
    monkeypatch.setattr(LoraAdapter, "lr_scale", {"grown": 10.0})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": 0.1}, {"params": [], "lr": 1.0}], lr=0.1)
    first = model.model[0].adapters["a"]

    def grow(self, step):
        if self is first and step == 1:
            self.grown = torch.nn.Parameter(torch.zeros(3))
            self.extra = torch.nn.Parameter(torch.zeros(2))

    monkeypatch.setattr(LoraAdapter, "on_step", grow)
    assert model.step_hook(1, opt) is True
    live = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for g in opt.param_groups for p in g["params"]] != [id(p) for p in live]  # two groups now
    assert opt.param_groups[1]["params"] == [first.grown]
    assert opt.param_groups[0]["params"] == [p for p in live if p is not first.grown]
    assert model.step_hook(2, opt) is False
