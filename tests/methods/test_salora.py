"""SaLoRA (spec 1.40): y = W x + b + s (I - U_s U_s^T) B A x, U_s the top-r_s eigenvectors of the layer's output
second moment on calibration data.

U_s against a hand-built closed-form covariance, U_s^T dW = 0, identity at init, merged == unmerged, the
missing-calibration error, save -> load, and config / layer errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, Calibration, ConfigError, UnsupportedLayerError
from peftkit.checkpoint.peft_format import adapter_state
from peftkit.methods.salora import SaLoraAdapter, SaLoraConfig, safety_basis

from ._helpers import close, rel_err, tiny_gpt2

OUT = 6


def _run(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"]).sum()


def hand_built(seed: int = 0):
    """Linear(6 -> 6) with W = Q diag(d) and a bias; inputs are the basis vectors, so the bias-free outputs are the
    columns of W and Y^T Y / N = Q diag(d^2) Q^T / 6: eigenvectors Q, eigenvalues d^2 / 6."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))
    d = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    layer = nn.Linear(OUT, OUT)
    with torch.no_grad():
        layer.weight.copy_(q * d)  # (out, in) = Q diag(d)
        layer.bias.copy_(torch.randn(OUT, generator=g))
    return nn.Sequential(layer), q


def build(r_s: int = 2, init=True, seed: int = 0):
    base, q = hand_built(seed)
    plain = copy.deepcopy(base)
    model = AdapterModel(base)
    calib = Calibration([{"x": torch.eye(OUT)[:3]}, {"x": torch.eye(OUT)[3:]}], _run)
    model.add_adapter("default", SaLoraConfig(target_modules=["0"], r=3, lora_alpha=5, salora_safety_rank=r_s,
                                              init_lora_weights=init), calibration=calib)
    host = model.model.get_submodule("0")
    return model, host, host.adapters["default"], plain, q


def test_safety_basis_equals_the_closed_form_eigenvectors():
    model, host, ad, plain, q = build(r_s=2)
    u = ad.salora_safety_basis.double()
    assert u.shape == (OUT, 2)
    assert torch.allclose(u.T @ u, torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((u.T @ q[:, :2]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-5)  # up to sign
    assert rel_err(u @ u.T, q[:, :2] @ q[:, :2].T) < 1e-5


def test_safety_basis_helper_orders_by_eigenvalue():
    cov = torch.diag(torch.tensor([1.0, 9.0, 4.0]))
    assert torch.equal(safety_basis(cov, 2).abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                                                                dtype=torch.float64))


def test_update_is_orthogonal_to_the_safety_directions():
    model, host, ad, plain, q = build(r_s=2, init=False)
    u = ad.salora_safety_basis.double()
    delta = ad.delta_weight().double()
    assert delta.abs().max() > 0.1
    assert (u.T @ delta).abs().max() < 1e-5
    x = torch.randn(4, OUT)
    with torch.no_grad():
        change = host(x).double() - plain(x).double()  # (4, out)
    assert (change @ u).abs().max() < 1e-5  # the layer output never moves along U_s
    raw = ad.scaling * ad.lora_B.double() @ ad.lora_A.double()
    assert rel_err(delta, raw - u @ (u.T @ raw)) < 1e-5  # dW = s (I - U U^T) B A


def test_identity_at_init():
    model, host, ad, plain, q = build()
    x = torch.randn(4, OUT)
    with torch.no_grad():
        assert torch.equal(host(x), plain(x))


def test_merged_equals_unmerged_and_unmerge_restores():
    model, host, ad, plain, q = build(init=False)
    x = torch.randn(4, OUT)
    w0 = host.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = host(x).clone()
        model.merge()
        assert close(host(x), before, 1e-5)
        model.unmerge()
        assert (host.base_layer.weight - w0).abs().max() <= 1e-6 * (1 + w0.abs().max())


def test_gradient_reaches_a_and_b():
    model, host, ad, plain, q = build(init=False)
    host(torch.randn(4, OUT)).square().sum().backward()
    assert ad.lora_A.grad.abs().max() > 0 and ad.lora_B.grad.abs().max() > 0
    u = ad.salora_safety_basis
    assert (u.T @ ad.lora_B.grad).abs().max() < 1e-5  # dL/dB = (I - U U^T) dL/dB': no safety component
    assert host.base_layer.weight.grad is None


def test_missing_calibration_names_calibration():
    model = AdapterModel(hand_built()[0])
    with pytest.raises(ConfigError, match="calibration") as e:
        model.add_adapter("default", SaLoraConfig(target_modules=["0"], r=2, salora_safety_rank=2))
    assert e.value.field == "calibration"
    assert not model.configs


def test_save_load_reproduces_without_calibration(tmp_path):
    model, host, ad, plain, q = build(init=False)
    x = torch.randn(4, OUT)
    with torch.no_grad():
        out = model(x)
    keys = set(adapter_state(model, "default"))
    assert keys == {"base_model.model.0." + k for k in ("lora_A.weight", "lora_B.weight", "salora_safety_basis")}
    peftkit.save_adapter(model, tmp_path, "default")
    loaded = AdapterModel(copy.deepcopy(plain))
    peftkit.load_adapter(loaded, tmp_path, "default")  # no calibration data needed: U_s is on disk
    loaded_ad = loaded.model.get_submodule("0").adapters["default"]
    assert isinstance(loaded_ad, SaLoraAdapter)
    assert torch.equal(loaded_ad.salora_safety_basis, ad.salora_safety_basis)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_conv1d_layer():
    base = tiny_gpt2()
    path = "transformer.h.0.mlp.c_fc"
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    model = AdapterModel(base)
    model.add_adapter("default", SaLoraConfig(target_modules=[path], r=2, salora_safety_rank=4,
                                              init_lora_weights=False),
                      calibration=Calibration([{"input_ids": ids}], lambda m, b: m(**b).logits.sum()))
    ad = model.model.get_submodule(path).adapters["default"]
    u = ad.salora_safety_basis.double()
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert (u.T @ ad.delta_weight().double()).abs().max() < 1e-5


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_safety_rank(value):
    with pytest.raises(ConfigError) as e:
        SaLoraConfig(target_modules=["0"], salora_safety_rank=value)
    assert e.value.field == "salora_safety_rank"


def test_safety_rank_above_out_features():
    model = AdapterModel(hand_built()[0])
    calib = Calibration([{"x": torch.eye(OUT)}], _run)
    with pytest.raises(ConfigError) as e:
        model.add_adapter("default", SaLoraConfig(target_modules=["0"], salora_safety_rank=OUT + 1), calibration=calib)
    assert e.value.field == "salora_safety_rank"


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_bias", True), ("init_lora_weights", "pissa")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        SaLoraConfig(target_modules=["0"], **{field: value})
    assert e.value.field == field


@pytest.mark.parametrize("layer", [nn.Embedding(10, 4), nn.Conv2d(3, 4, 3)])
def test_unsupported_layers_raise(layer):
    model = AdapterModel(nn.Sequential(layer))
    with pytest.raises(UnsupportedLayerError):
        model.add_adapter("default", SaLoraConfig(target_modules=["0"], r=2, salora_safety_rank=2),
                          calibration=Calibration([{"x": torch.zeros(1, 3, dtype=torch.long)}], _run))


def test_method_and_peft_type():
    config = SaLoraConfig(target_modules=["0"])
    assert config.method == "salora" and config.peft_type == "SALORA"
