"""ETHER / ETHER+ (spec 1.21): the blockwise fast path against a dense blockdiag(H) twin built by loops (fp64),
reflection invariants (H^T H = I, det = -1 per block), the distance bounds, ETHER+ identity at init, exact merge
(also for a singular H+), the lowered form, checkpoints and config errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, ConfigError, UnsupportedLayerError
from peftkit.core.registry import config_for_peft_type
from peftkit.methods.ether import EtherAdapter, EtherConfig, EtherPlusAdapter

from ._helpers import close, hosts, logits, perturb, tiny_gpt2, tiny_llama, token_ids

VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (ether_plus, two_sided)
IDS = ["ether", "ether-hh", "ether_plus", "ether_plus-hh"]


def _adapter(n_in: int = 16, n_out: int = 12, dtype=torch.float32, seed: int = 0, **cfg) -> EtherAdapter:
    torch.manual_seed(seed)
    model = AdapterModel(nn.Sequential(nn.Linear(n_in, n_out, dtype=dtype)))
    model.add_adapter("a", EtherConfig(target_modules=["0"], **cfg))
    return hosts(model)["0"].adapters["a"]


def _blockdiag(terms, n: int) -> torch.Tensor:
    """blockdiag(H_1..H_nb) (n, n) in fp64, entry by entry from H_i = I + sum_k c_k w_k w_k^T."""
    nb = terms[0][0].shape[0]
    d = n // nb
    h = torch.zeros(n, n, dtype=torch.float64)
    for i in range(nb):
        for a in range(d):
            for b in range(d):
                value = float(a == b) + sum(float(c[i]) * float(w[i, a]) * float(w[i, b]) for w, c in terms)
                h[i * d + a, i * d + b] = value
    return h


def _dense_twin(ad: EtherAdapter) -> torch.Tensor:
    """W' (out, in) = [blockdiag(H~)] W blockdiag(H), from the definitions (fp64)."""
    w = ad.ops.weight2d().detach().double()
    terms = [(v.detach(), c.detach()) for v, c in ad.terms()]
    out = w @ _blockdiag(terms, w.shape[1])
    if ad.two_sided:
        out = _blockdiag([(v.detach(), c.detach()) for v, c in ad.terms("_left")], w.shape[0]) @ out
    return out


@pytest.mark.parametrize("plus,two", VARIANTS, ids=IDS)
def test_forward_and_merge_equal_dense_twin(plus, two):
    ad = _adapter(ether_plus=plus, two_sided=two, init_weights=False, nb=4)
    perturb(ad.named_parameters())
    w = ad.ops.weight2d().detach().double()
    delta = _dense_twin(ad) - w  # (out, in)
    x = torch.randn(3, 5, 16)
    assert close(ad(x, x @ w.float().T), x.double() @ delta.T)
    assert close(ad.delta_weight(), delta)


@pytest.mark.parametrize("plus,two", VARIANTS, ids=IDS)
def test_conv1d_layer_equals_linear_layer(plus, two):
    """GPT-2 Conv1D (weight stored (in, out)) gives the same adapter as a Linear with the transposed weight."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 16)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    models = [AdapterModel(nn.Sequential(m)) for m in (conv, lin)]
    for m in models:
        torch.manual_seed(1)
        m.add_adapter("a", EtherConfig(target_modules=["0"], ether_plus=plus, two_sided=two, init_weights=False))
    x = torch.randn(4, 16)
    assert close(models[0](x), models[1](x))
    assert close(hosts(models[0])["0"].adapters["a"].delta_weight(), hosts(models[1])["0"].adapters["a"].delta_weight())


def test_reflections_are_orthogonal_with_det_minus_one_fp64():
    """ETHER's H from the adapter's own forward (W = I, fp64): H^T H = I and det(H_i) = -1 for every block."""
    ad = _adapter(16, 16, dtype=torch.float64, nb=4)
    perturb(ad.named_parameters(), scale=0.3)
    with torch.no_grad():
        ad.ops.weight.copy_(torch.eye(16, dtype=torch.float64))
        h = torch.eye(16, dtype=torch.float64) + ad(torch.eye(16, dtype=torch.float64), None)  # rows: (H e_i)^T
    assert h.dtype == torch.float64
    torch.testing.assert_close(h.T @ h, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    for i in range(4):
        block = h[4 * i:4 * i + 4, 4 * i:4 * i + 4]
        assert abs(torch.linalg.det(block).item() + 1) < 1e-12
        off = h[4 * i:4 * i + 4].clone()
        off[:, 4 * i:4 * i + 4] = 0
        assert off.abs().max().item() == 0  # block-diagonal


def test_ether_plus_is_not_orthogonal_but_bounded():
    ad = _adapter(16, 16, dtype=torch.float64, ether_plus=True, init_weights=False)
    with torch.no_grad():
        ad.ops.weight.copy_(torch.eye(16, dtype=torch.float64))
        h = torch.eye(16, dtype=torch.float64) + ad(torch.eye(16, dtype=torch.float64), None)
    assert (h.T @ h - torch.eye(16, dtype=torch.float64)).abs().max().item() > 1e-3
    torch.testing.assert_close(h, h.T, atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(h - torch.eye(16, dtype=torch.float64), ord=2).item() <= 1 + 1e-12


@pytest.mark.parametrize("plus,bound", [(False, 2.0), (True, 1.0)], ids=["ether", "ether_plus"])
def test_distance_from_base_is_bounded(plus, bound):
    """|W' - W|_F <= 2 |W|_F (ETHER: |H - I|_2 = 2); ETHER+: <= |W|_F (|H+ - I|_2 <= 1)."""
    for seed in range(5):
        ad = _adapter(ether_plus=plus, init_weights=False, seed=seed)
        perturb(ad.named_parameters(), seed=seed, scale=1.0)
        w = ad.ops.weight2d().detach()
        assert ad.delta_weight().norm() <= bound * w.norm() * (1 + 1e-5)


def test_ether_plus_equals_base_exactly_at_init_and_ether_does_not():
    base, x = tiny_llama(), token_ids()
    want = logits(base, x)
    targets = ["q_proj", "v_proj", "down_proj"]
    plus = AdapterModel(copy.deepcopy(base))
    plus.add_adapter("a", EtherConfig(target_modules=targets, ether_plus=True, two_sided=True))
    assert torch.equal(logits(plus, x), want)
    plain = AdapterModel(copy.deepcopy(base))
    plain.add_adapter("a", EtherConfig(target_modules=targets))
    assert (logits(plain, x) - want).abs().max().item() > 1e-3
    assert "identity_at_init" in EtherPlusAdapter.capabilities and "identity_at_init" not in EtherAdapter.capabilities


def test_init_kaiming_per_block_and_v_is_minus_u():
    ad = _adapter(64, 8, ether_plus=True, two_sided=True, nb=4)
    for suffix, d in (("", 16), ("_left", 2)):
        u, v = getattr(ad, "ether_u" + suffix), getattr(ad, "ether_v" + suffix)
        assert u.shape == (4, d) and torch.equal(v, -u)
        assert u.abs().max().item() <= d ** -0.5
    assert not torch.equal(ad.ether_u[0], ad.ether_u[1])  # independent draws per block (see docs)


@pytest.mark.parametrize("plus,two", VARIANTS, ids=IDS)
def test_merge_unmerge_and_lowered(plus, two):
    base, x = tiny_gpt2(), token_ids()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("a", EtherConfig(target_modules=["c_attn", "c_fc"], nb=8, ether_plus=plus, two_sided=two,
                                       init_weights=False))
    perturb(model.named_parameters())
    want = logits(model, x)
    for path, host in hosts(model).items():
        ad = host.adapters["a"]
        low = ad.lowered()
        assert low.rank == 8 * ((2 if plus else 1) + ((2 if plus else 1) if two else 0)), path
        h = torch.randn(2, 3, ad.ops.in_features)
        z = h @ ad.ops.weight2d().detach().T
        assert close(low.contribution(ad.ops, h, z), ad(h, z))
    before = copy.deepcopy(base.state_dict())
    model.merge()
    assert close(logits(model, x), want)
    model.unmerge()
    for k, v in model.model.state_dict().items():
        if ".adapters." not in k:
            torch.testing.assert_close(v, before[k.replace(".base_layer", "")], atol=1e-6, rtol=0)


def test_unmerge_restores_a_singular_ether_plus():
    """v perpendicular to u in every block: H+ is singular (no inverse), yet unmerge restores W (D is kept)."""
    model = AdapterModel(nn.Sequential(nn.Linear(8, 8)))
    torch.manual_seed(0)
    model.add_adapter("a", EtherConfig(target_modules=["0"], ether_plus=True, nb=2))
    ad = hosts(model)["0"].adapters["a"]
    with torch.no_grad():
        ad.ether_u.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        ad.ether_v.copy_(torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    w0 = ad.ops.weight2d().detach().clone()
    merged = w0 + ad.delta_weight()
    assert torch.linalg.matrix_rank(merged.double()) < torch.linalg.matrix_rank(w0.double())  # singular H+
    model.merge()
    model.unmerge()
    torch.testing.assert_close(ad.ops.weight2d(), w0, atol=1e-6, rtol=0)


def test_ether_unmerges_with_the_transpose():
    """For ETHER the spec's closed form holds: (W H) H^T = W (each H_i orthogonal)."""
    ad = _adapter(16, 16, dtype=torch.float64, init_weights=False)
    perturb(ad.named_parameters(), scale=0.5)
    w = ad.ops.weight2d().detach()
    h = _blockdiag([(v.detach(), c.detach()) for v, c in ad.terms()], 16)
    merged = w + ad.delta_weight().double()
    torch.testing.assert_close(merged @ h.T, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("plus,two", VARIANTS, ids=IDS)
def test_parameter_counts_and_save_load(plus, two, tmp_path):
    base, x = tiny_gpt2(), token_ids()
    model = AdapterModel(copy.deepcopy(base))
    config = EtherConfig(target_modules=["c_fc"], nb=4, ether_plus=plus, two_sided=two, init_weights=False)
    model.add_adapter("a", config)
    n_in, n_out = 32, 128  # c_fc: 32 -> 128, 2 layers
    per_side = 2 if plus else 1
    assert model.param_report().trainable == 2 * per_side * (n_in + (n_out if two else 0))
    perturb(model.named_parameters())
    peftkit.save_adapter(model, tmp_path, "a")
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path, "a")
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.configs["a"] == config


def test_registry_selects_the_variant():
    assert EtherConfig().method == "ether" and EtherConfig(ether_plus=True).method == "ether_plus"
    assert config_for_peft_type("ETHER") is EtherConfig
    assert peftkit.get_method("ether_plus").make_config(target_modules=["q"]).ether_plus is True


@pytest.mark.parametrize("field,value", [("nb", 0), ("nb", 2.5), ("nb", True), ("ether_plus", "yes"),
                                         ("two_sided", 1), ("init_weights", None)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        EtherConfig(target_modules=["q"], **{field: value})
    assert info.value.field == field


def test_nb_must_divide_the_widths():
    model = AdapterModel(nn.Sequential(nn.Linear(12, 10)))
    with pytest.raises(ConfigError, match="must divide") as info:
        model.add_adapter("a", EtherConfig(target_modules=["0"], nb=8))
    assert info.value.field == "nb"
    with pytest.raises(ConfigError, match="out_features=10"):
        model.add_adapter("a", EtherConfig(target_modules=["0"], nb=4, two_sided=True))


def test_embeddings_are_unsupported():
    model = AdapterModel(nn.Sequential(nn.Embedding(16, 8)))
    with pytest.raises(UnsupportedLayerError):
        model.add_adapter("a", EtherConfig(target_modules=["0"]))
