"""SURM (spec 1.27): the FFT / reshape fast paths against the dense materialized twin, the dense twin against the
definitions (loops), full rank, identity at init, merge, and config errors naming the field.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError
from peftkit.methods.surm import SurmAdapter, SurmConfig

from ._helpers import close, hosts, logits, perturb

SHAPES = [(12, 12), (8, 12), (20, 12), (6, 9), (7, 5)]  # (out, in): square, both rectangles, gcd 3, gcd 1


def _adapter(n_out: int, n_in: int, seed: int = 0, **cfg) -> SurmAdapter:
    torch.manual_seed(seed)
    model = AdapterModel(nn.Sequential(nn.Linear(n_in, n_out)))
    model.add_adapter("a", SurmConfig(target_modules=["0"], init_weights=False, **cfg))
    return hosts(model)["0"].adapters["a"]


def _circulant_loops(c: torch.Tensor) -> torch.Tensor:
    d = c.numel()
    return torch.stack([torch.stack([c[(i - j) % d] for j in range(d)]) for i in range(d)])


def _toeplitz_loops(t: torch.Tensor, d: int) -> torch.Tensor:
    return torch.stack([torch.stack([t[i - j + d - 1] for j in range(d)]) for i in range(d)])


def _dense_loops(ad: SurmAdapter) -> torch.Tensor:
    """S from the definitions: a grid of g x g blocks, each built entry by entry."""
    v, g = ad.surm_weight.detach(), ad.g
    make = _circulant_loops if ad.structure == "circulant" else (lambda t: _toeplitz_loops(t, g))
    return torch.cat([torch.cat([make(v[i, j]) for j in range(v.shape[1])], 1) for i in range(v.shape[0])], 0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker"])
def test_fast_path_equals_dense(structure, shape):
    ad = _adapter(*shape, surm_structure=structure, surm_alpha=0.7)
    x = torch.randn(2, 3, shape[1])
    s = ad.dense().detach()
    assert s.shape == shape
    assert close(ad(x, None), 0.7 * x @ s.T)
    assert close(ad.delta_weight(), 0.7 * s)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("structure", ["circulant", "toeplitz"])
def test_dense_matches_definition(structure, shape):
    ad = _adapter(*shape, surm_structure=structure)
    assert ad.surm_weight.shape[-1] == (ad.g if structure == "circulant" else 2 * ad.g - 1)
    assert torch.equal(ad.dense().detach(), _dense_loops(ad))


def test_kronecker_matches_definition_and_shape():
    ad = _adapter(12, 20, surm_structure="kronecker", surm_kron_shape=(3, 4))
    p, q = ad.surm_P.detach(), ad.surm_Q.detach()
    assert q.shape == (4, 5)
    want = torch.zeros(12, 20)
    for i in range(3):
        for j in range(4):
            want[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = p[i, j] * q
    assert torch.equal(ad.dense().detach(), want)
    assert _adapter(64, 32, surm_structure="kronecker").surm_P.shape == (8, 4)  # balanced default


@pytest.mark.parametrize("structure", ["circulant", "toeplitz"])
def test_random_structure_has_full_rank(structure):
    d = _adapter(16, 16, surm_structure=structure).dense().detach().double()
    assert torch.linalg.matrix_rank(d).item() == 16
    rect = _adapter(8, 24, surm_structure=structure).dense().detach().double()
    assert torch.linalg.matrix_rank(rect).item() == 8


def test_gradients_flow_through_fft():
    ad = _adapter(8, 12, surm_structure="toeplitz")
    x = torch.randn(5, 12)
    ad(x, None).square().sum().backward()
    g_fast = ad.surm_weight.grad.clone()
    ad.surm_weight.grad = None
    (x @ ad.dense().T).square().sum().backward()
    assert close(g_fast, ad.surm_weight.grad)


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker"])
def test_identity_at_init_and_merge(structure):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 8))
    x = torch.randn(4, 12)
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("a", SurmConfig(target_modules=["0", "2"], surm_structure=structure))
    assert torch.equal(logits(model, x), logits(base, x))
    perturb(model.named_parameters(), seed=4)
    y = logits(model, x)
    assert not close(y, logits(base, x))
    model.merge()
    assert close(logits(model, x), y)
    model.unmerge()
    assert torch.allclose(model.model[0].base_layer.weight, base[0].weight, atol=1e-6)


@pytest.mark.parametrize("kw,field", [(dict(surm_structure="hankel"), "surm_structure"),
                                      (dict(surm_kron_shape=(0, 2)), "surm_kron_shape"),
                                      (dict(surm_kron_shape=(2,)), "surm_kron_shape"),
                                      (dict(surm_alpha=float("nan")), "surm_alpha"),
                                      (dict(surm_dropout=-0.1), "surm_dropout")])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError) as e:
        SurmConfig(**kw)
    assert e.value.field == field


def test_kron_shape_not_dividing_layer_names_field():
    model = AdapterModel(nn.Sequential(nn.Linear(12, 20)))
    with pytest.raises(ConfigError, match=r"\(20, 12\)") as e:
        model.add_adapter("a", SurmConfig(target_modules=["0"], surm_structure="kronecker", surm_kron_shape=(3, 4)))
    assert e.value.field == "surm_kron_shape"


def test_kron_shape_list_from_json_is_a_tuple():
    assert SurmConfig.from_dict({"surm_structure": "kronecker", "surm_kron_shape": [2, 3]}).surm_kron_shape == (2, 3)
