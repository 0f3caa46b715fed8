"""S2-LoRA (spec 1.26): one (A, B) pair per layer shape shared as one storage, lambda = 0 identity, the closed
form y = W x + b + s B diag(lambda) A x, shared gradients = the sum over layers (untied slow twin), the L1 term,
merge, save -> load and clear config errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError
from peftkit.methods.s2lora import S2LoraAdapter, S2LoraConfig

from ._helpers import hosts, logits, perturb, tiny_llama, token_ids

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 3, **kw) -> AdapterModel:
    model = AdapterModel(tiny_llama())
    model.add_adapter("default", S2LoraConfig(target_modules=ALL, r=4, lora_alpha=8, **kw))
    if seed is not None:
        perturb(model.named_parameters(), seed=seed, scale=0.3)
    return model


def _adapters(model: AdapterModel) -> dict[str, S2LoraAdapter]:
    return {p: h.adapters["default"] for p, h in hosts(model).items()}


def test_pairs_are_one_storage_per_shape():
    ads = _adapters(_llama(seed=None))
    q0, o1 = ads["model.layers.0.self_attn.q_proj"], ads["model.layers.1.self_attn.o_proj"]
    k0, v1 = ads["model.layers.0.self_attn.k_proj"], ads["model.layers.1.self_attn.v_proj"]
    assert q0.s2lora_A is o1.s2lora_A and q0.s2lora_B is o1.s2lora_B
    assert q0.s2lora_A.data_ptr() == o1.s2lora_A.data_ptr()
    assert k0.s2lora_A is v1.s2lora_A
    assert q0.s2lora_A is not k0.s2lora_A and q0.s2lora_B.shape != k0.s2lora_B.shape
    assert q0.s2lora_lambda is not o1.s2lora_lambda
    assert len({id(a.s2lora_A) for a in ads.values()}) == 4  # 64x64, 32x64, 128x64, 64x128


def test_init_is_gaussian_factors_and_zero_lambda_identity():
    base, x = tiny_llama(), token_ids()
    model = _llama(seed=None)
    ad = _adapters(model)["model.layers.0.mlp.gate_proj"]
    assert torch.equal(ad.s2lora_lambda, torch.zeros(4))
    assert abs(ad.s2lora_A.std().item() - 0.02) < 0.003 and abs(ad.s2lora_B.std().item() - 0.02) < 0.003
    assert torch.equal(logits(model, x), logits(base, x))


def test_zero_lambda_of_one_layer_leaves_that_layer_alone():
    model = _llama()
    ad = _adapters(model)["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        ad.s2lora_lambda.zero_()
    host = hosts(model)["model.layers.1.self_attn.q_proj"]
    x = torch.randn(3, 64)
    assert torch.equal(host(x), host.base_layer(x))
    assert ad.s2lora_A.abs().sum() > 0  # the shared pair itself is not zero


def test_forward_and_delta_match_the_closed_form():
    model = _llama()
    path = "model.layers.0.mlp.down_proj"
    ad, host = _adapters(model)[path], hosts(model)[path]
    a, b, lam, s = ad.s2lora_A.detach(), ad.s2lora_B.detach(), ad.s2lora_lambda.detach(), 8 / 4
    x = torch.randn(5, 128)
    want = host.base_layer(x) + s * x @ a.T @ torch.diag(lam) @ b.T
    torch.testing.assert_close(host(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ad.delta_weight(), s * b @ torch.diag(lam) @ a, atol=1e-7, rtol=1e-6)


def test_shared_gradient_is_the_sum_of_per_layer_contributions():
    x = token_ids()
    model = _llama()
    model(x).logits.square().mean().backward()
    twin = _llama()  # same seeds, same values; every layer gets its own copy of the pair
    copies: dict[str, list[nn.Parameter]] = {}
    for ad in _adapters(twin).values():
        ad.s2lora_A = nn.Parameter(ad.s2lora_A.detach().clone())
        copies.setdefault(ad.key, []).append(ad.s2lora_A)
    twin(x).logits.square().mean().backward()
    shared = {ad.key: ad.s2lora_A.grad for ad in _adapters(model).values()}
    for key, params in copies.items():
        assert len(params) >= 2
        torch.testing.assert_close(shared[key], sum(p.grad for p in params), atol=1e-7, rtol=1e-5)


def test_l1_term_is_mu_times_the_sum_of_lambda_norms():
    model = _llama(s2_l1=0.05)
    lams = [ad.s2lora_lambda for ad in _adapters(model).values()]
    want = 0.05 * sum(lam.detach().abs().sum() for lam in lams)
    loss = model.extra_losses()["s2lora_l1"]
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    torch.testing.assert_close(lams[0].grad, 0.05 * torch.sign(lams[0].detach()))
    assert "s2lora_l1" not in _llama(s2_l1=0.0).extra_losses()


def test_merged_equals_unmerged_and_unmerge_restores():
    model, x = _llama(), token_ids()
    want = logits(model, x)
    before = copy.deepcopy(hosts(model)["model.layers.0.self_attn.q_proj"].base_layer.weight)
    model.merge()
    assert (logits(model, x) - want).abs().max() < 1e-5
    model.unmerge()
    torch.testing.assert_close(hosts(model)["model.layers.0.self_attn.q_proj"].base_layer.weight, before,
                               atol=1e-6, rtol=0)


def test_save_load_reproduces_with_each_pair_written_once(tmp_path):
    model, x = _llama(), token_ids()
    peftkit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    shared = sorted(k for k in keys if k.startswith("base_model.s2lora_"))
    assert shared == sorted(f"base_model.s2lora_{f}.{s}" for f in "AB" for s in ("64x64", "32x64", "128x64", "64x128"))
    assert len(keys) == len(shared) + 14  # one lambda per adapted matrix
    loaded = AdapterModel(tiny_llama())
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    ads = _adapters(loaded)
    assert ads["model.layers.0.self_attn.q_proj"].s2lora_A is ads["model.layers.1.self_attn.o_proj"].s2lora_A


def test_trainable_count_is_pairs_plus_lambdas():
    model = _llama(seed=None)
    pairs = 4 * (64 + 64) + 4 * (32 + 64) + 4 * (128 + 64) + 4 * (64 + 128)
    assert model.param_report().trainable == pairs + 14 * 4


def test_conv_layers_of_one_shape_share():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model = AdapterModel(net)
    model.add_adapter("default", S2LoraConfig(target_modules=["0", "2"], r=2))
    perturb(model.named_parameters(), scale=0.5)
    ads = _adapters(model)
    assert ads["0"].s2lora_A is ads["2"].s2lora_A and ads["0"].key == "4x4x3x3"
    x = torch.randn(2, 4, 5, 5)
    want = model(x)
    model.merge()
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("r", 0), ("lora_alpha", 0), ("s2_l1", -1e-3), ("s2_l1", float("nan")),
                                         ("s2_l1", True)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        S2LoraConfig(target_modules=["q_proj"], **{field: value})
    assert e.value.field == field
