"""The in-place fused DoRA path (bias-free 2-D layers) against the plain autograd path: same values and grads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, LoraConfig
from peftkit.methods.dora import _ScaledAddInPlace


def _layer(bias: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10, bias=bias)).double()
    model = AdapterModel(net)
    model.add_adapter("d", LoraConfig(target_modules=["0"], r=3, lora_alpha=5, use_dora=True, init_lora_weights=False))
    host = model.model[0]
    ad = host.adapters["d"]
    with torch.no_grad():
        ad.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 10, dtype=torch.float64))
    return model, host, ad


def _grads(out, tensors):
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * g).sum(), tensors)


@pytest.mark.parametrize("zero_m", [False, True])
def test_fused_matches_plain_autograd(zero_m):
    model, host, ad = _layer(bias=False)
    if zero_m:
        with torch.no_grad():
            ad.lora_magnitude_vector[3] = 0.0  # forces the plain path (dm divides by m)
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    params = [x, ad.lora_A, ad.lora_B, ad.lora_magnitude_vector]
    assert ad._can_fuse(*(lambda z: (z, x, z))(host.base_layer(x))) is not zero_m
    fused = host(x)  # the host hands z over: y is z
    z = host.base_layer(x)
    plain = z + ad.forward(x, z)  # reference: out-of-place contribution
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(fused, params), _grads(plain, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_matches_closed_form():
    model, host, ad = _layer(bias=False)
    x = torch.randn(5, 12, dtype=torch.float64)
    w = host.base_layer.weight
    v = w + ad.scaling * ad.lora_B @ ad.lora_A  # (out, in)
    want = x @ ((ad.lora_magnitude_vector / v.norm(dim=1))[:, None] * v).T
    with torch.no_grad():
        torch.testing.assert_close(host(x), want, rtol=1e-12, atol=1e-12)


def test_gradcheck_of_fused_path():
    """Finite differences in x, A, B and m (n is detached by design, so it is held fixed while probing)."""
    model, host, ad = _layer(bias=False)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert "ScaledAddInPlace" in type(host(x).grad_fn).__name__
    n = ad.weight_norm().clone()
    ad.weight_norm = lambda: n  # freeze the detached norm for the finite-difference probes

    def f(xx, a, b, m):
        with torch.no_grad():
            ad.lora_A.copy_(a)
            ad.lora_B.copy_(b)
            ad.lora_magnitude_vector.copy_(m)
        z = host.base_layer(xx)
        return _ScaledAddInPlace.apply(z, xx, a, b, m, n, ad.scaling)

    inputs = (x, ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_(),
              ad.lora_magnitude_vector.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


def test_two_active_adapters_do_not_share_the_consumed_output():
    model, host, ad = _layer(bias=False)
    model.add_adapter("e", LoraConfig(target_modules=["0"], r=2, use_dora=True, init_lora_weights=False))
    model.set_active("d", "e")
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        z = host.base_layer(x)
        want = z + ad.forward(x, z) + host.adapters["e"].forward(x, z)
        torch.testing.assert_close(host(x), want, rtol=1e-12, atol=1e-12)
