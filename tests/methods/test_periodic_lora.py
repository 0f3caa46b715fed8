"""PeriodicLoRA (spec 1.37): unloads keep the function, accumulate a rank <= stages * r update in the base, are
undone by delete/unload, survive save -> load onto the original base, and reset the optimizer state they restart.

Unload every T_s steps: W <- W + (1 - mu) s B A; B <- mu B; mu = 0: A <- kaiming, B <- 0.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, LoraConfig
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.periodic_lora import PeriodicLoraAdapter, PeriodicLoraConfig

from ._helpers import hosts, perturb, tiny_gpt2


def _linear():
    return nn.Sequential(nn.Linear(16, 12)), ["0"], torch.randn(5, 16)


def _conv1d():
    return tiny_gpt2(), ["h.0.attn.c_attn", "h.1.mlp.c_fc"], torch.randint(0, 96, (2, 4))


def _embedding():
    return nn.Sequential(nn.Embedding(30, 10)), ["0"], torch.randint(0, 30, (4, 6))


def _conv2d():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1)), ["0"], torch.randn(2, 3, 6, 6)


KINDS = {"linear": _linear, "conv1d": _conv1d, "embedding": _embedding, "conv2d": _conv2d}


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def build(kind: str = "linear", seed: int = 0, **fields):
    """(model with a perturbed periodic_lora adapter, pristine base copy, input, adapters by path)."""
    torch.manual_seed(seed)
    base, target, x = KINDS[kind]()
    pristine = copy.deepcopy(base)
    model = AdapterModel(base)
    model.add_adapter("default", PeriodicLoraConfig(**{"target_modules": target, "r": 2, "lora_alpha": 4,
                                                       "plora_stage_steps": 2, **fields}))
    perturb(model.named_parameters(), seed=seed + 1)
    return model, pristine, x, {p: h.adapters["default"] for p, h in hosts(model).items()}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: h.ops.weight2d().detach().clone() for p, h in hosts(model).items()}


def _train(model: AdapterModel, x, steps: int, lr: float = 0.05) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out.logits
        (out - 1).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.step_hook(step, opt)
    return opt


@pytest.mark.parametrize("mu", [0.0, 0.6])
@pytest.mark.parametrize("kind", list(KINDS))
def test_function_is_continuous_across_an_unload(kind: str, mu: float) -> None:
    model, _, x, adapters = build(kind, plora_momentum=mu)
    y0, w0 = _out(model, x), _weights(model)
    before = {p: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for p, a in adapters.items()}
    model.step_hook(1)
    assert torch.equal(_out(model, x), y0), "no unload before step T_s"
    model.step_hook(2)
    torch.testing.assert_close(_out(model, x), y0, atol=1e-5, rtol=1e-5)
    for p, a in adapters.items():
        a0, b0 = before[p]
        flat_a, flat_b = a0.reshape(a0.shape[0], -1), b0.reshape(b0.shape[0], -1)
        torch.testing.assert_close(_weights(model)[p], w0[p] + (1 - mu) * a.scaling * flat_b @ flat_a)
        if mu > 0:
            assert torch.equal(a.lora_A, a0) and torch.allclose(a.lora_B, mu * b0)
        else:
            assert not torch.equal(a.lora_A, a0) or kind == "embedding"
            product = a.ops.flat(a.lora_B) @ a.ops.flat(a.lora_A)  # (out, in_flat): zero after a reset
            assert product.abs().max() == 0


def test_mu_zero_is_plain_unloading() -> None:
    """W <- W + s B A, A ~ kaiming-uniform (|A| <= 1/sqrt(in)), B = 0, one stage recorded."""
    model, _, _, adapters = build("linear")
    a = adapters["0"]
    w0, a0, b0 = _weights(model)["0"], a.lora_A.detach().clone(), a.lora_B.detach().clone()
    reset = a.on_step(2)
    torch.testing.assert_close(_weights(model)["0"], w0 + a.scaling * b0 @ a0)
    assert {id(p) for p in reset} == {id(a.lora_A), id(a.lora_B)}
    assert torch.equal(a.lora_B, torch.zeros_like(a.lora_B))
    assert a.lora_A.abs().max() <= 1 / math.sqrt(16) and a.lora_A.abs().max() > 0
    assert a.stages() == 1
    torch.testing.assert_close(a.past_delta(), a.scaling * b0 @ a0)


def test_total_update_rank_is_at_most_stages_times_r() -> None:
    model, pristine, x, adapters = build("linear", plora_stage_steps=3)
    _train(model, x, steps=9)  # 3 unloads, rank 2 each
    delta = _weights(model)["0"] - pristine[0].weight.detach()  # (out, in)
    rank = int(torch.linalg.matrix_rank(delta.double(), atol=1e-5))
    assert 2 < rank <= 3 * 2, rank
    assert adapters["0"].stages() == 3
    torch.testing.assert_close(delta, adapters["0"].past_delta(), atol=1e-6, rtol=1e-5)


def test_delete_and_unload_restore_the_base() -> None:
    for release in ("delete", "unload"):
        model, pristine, x, _ = build("linear")
        _train(model, x, steps=5)
        if release == "delete":
            model.delete_adapter("default")
            restored = model.model
        else:
            restored = model.unload()
        torch.testing.assert_close(restored[0].weight, pristine[0].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(_out(restored, x), _out(pristine, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
def test_save_load_onto_the_pristine_base(kind: str, tmp_path) -> None:
    model, pristine, x, _ = build(kind, plora_momentum=0.3)
    _train(model, x, steps=5)  # 2 unloads and a live stage
    y = _out(model, x)
    peftkit.save_adapter(model, tmp_path, "default")
    loaded = AdapterModel(copy.deepcopy(pristine))
    peftkit.load_adapter(loaded, tmp_path, "default")
    torch.testing.assert_close(_out(loaded, x), y, atol=1e-5, rtol=1e-5)
    for p, w in _weights(model).items():
        torch.testing.assert_close(_weights(loaded)[p], w, atol=1e-6, rtol=1e-6)
    loaded.delete_adapter("default")
    torch.testing.assert_close(_out(loaded, x), _out(pristine, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_original_base_form_is_one_wider_lora(rslora: bool, tmp_path) -> None:
    model, pristine, x, _ = build("linear", use_rslora=rslora, plora_max_stages=3)
    _train(model, x, steps=5)
    y = _out(model, x)
    peftkit.save_adapter(model, tmp_path, "default", original_base=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["plora_max_stages"]) == (4 * 2, 0)
    loaded = AdapterModel(copy.deepcopy(pristine))
    config = peftkit.load_adapter(loaded, tmp_path, "default")
    assert config.scaling == pytest.approx(model.configs["default"].scaling)
    torch.testing.assert_close(_out(loaded, x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.model[0].base_layer.weight, pristine[0].weight, atol=0, rtol=0)


def test_merge_adds_the_live_stage() -> None:
    model, pristine, x, adapters = build("linear")
    _train(model, x, steps=5)
    a, y = adapters["0"], _out(model, x)
    expected = pristine[0].weight.detach() + a.past_delta() + a.delta_weight()  # (out, in)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged[0].weight.detach(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_out(merged, x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_step_hook_drops_the_adamw_state_of_reset_factors(mu: float) -> None:
    model, _, x, adapters = build("linear", plora_momentum=mu)
    a = adapters["0"]
    opt = _train(model, x, steps=1)
    assert a.lora_A in opt.state and a.lora_B in opt.state
    model.step_hook(2, opt)
    kept = mu > 0
    assert (a.lora_A in opt.state) == kept and (a.lora_B in opt.state) == kept
    _train(model, x, steps=1)  # training goes on after the reset


def test_capacity_then_plain_lora_with_a_warning() -> None:
    model, _, x, adapters = build("linear", plora_max_stages=1)
    a = adapters["0"]
    model.step_hook(2)
    w = _weights(model)["0"]
    with pytest.warns(UserWarning, match="plora_max_stages"):
        model.step_hook(4)
    assert a.stages() == 1 and torch.equal(_weights(model)["0"], w)
    model, _, x, adapters = build("linear", plora_max_stages=0)
    model.step_hook(2)
    assert adapters["0"].stages() == 0 and adapters["0"].plora_past_A.shape == (0, 16)


def test_registry_keeps_lora() -> None:
    assert config_for_peft_type("LORA") is LoraConfig
    assert config_for_peft_type("PERIODIC_LORA") is PeriodicLoraConfig
    assert PeriodicLoraConfig().method == "periodic_lora"
    assert peftkit.get_method("periodic_lora").adapter_cls is PeriodicLoraAdapter


BAD = [("plora_stage_steps", 0), ("plora_stage_steps", 1.5), ("plora_momentum", 1.0), ("plora_momentum", -0.1),
       ("plora_max_stages", -1), ("init_lora_weights", "pissa"), ("use_dora", True)]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_config_values_name_the_field(field: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        PeriodicLoraConfig(target_modules=["0"], **{field: value})
    assert info.value.field == field
