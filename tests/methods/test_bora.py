"""BoRA (spec 1.5): W' = diag(m_r/||V||_row) V diag(m_c/||R||_col) with V = W + s B A, R the row-scaled V.

Identity at init, the explicit fp64 formula, ||W'||_col = m_c, the reduction to DoRA when m_c = ||R||_col, the
detached norms in the gradient, merge / unmerge, and config / layer errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import AdapterModel, ConfigError, LoraConfig, UnsupportedLayerError
from peftkit.checkpoint.peft_format import adapter_state
from peftkit.methods.bora import BoraAdapter, BoraConfig

from ._helpers import close, rel_err, tiny_gpt2

NAMES = ("lora_A", "lora_B", "bora_magnitude_row", "bora_magnitude_col")


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12)), "0", torch.randn(5, 16)


def _conv1d():
    return tiny_gpt2(), "transformer.h.0.attn.c_attn", torch.randn(2, 3, 32)


KINDS = {"linear": _linear, "conv1d": _conv1d}


def build(kind: str = "linear", **fields):
    base, path, x = KINDS[kind]()
    plain = copy.deepcopy(base).get_submodule(path)
    model = AdapterModel(base)
    model.add_adapter("default", BoraConfig(target_modules=[path], r=3, lora_alpha=5, **fields))
    host = model.model.get_submodule(path)
    return model, host, host.adapters["default"], plain, x


def w2d(kind: str, layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().double()
    return w.T if kind == "conv1d" else w  # transformers Conv1D stores (in, out)


@torch.no_grad()
def randomize(ad: BoraAdapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in NAMES:
        p = getattr(ad, name)
        if name.startswith("bora"):
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))  # magnitudes move off the base norms
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def explicit(ad: BoraAdapter, w: torch.Tensor) -> torch.Tensor:
    """W' in fp64, written out step by step."""
    a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
    m_r, m_c = ad.bora_magnitude_row.detach().double(), ad.bora_magnitude_col.detach().double()
    v = w + ad.scaling * b @ a
    r = torch.diag(m_r / torch.linalg.norm(v, dim=1)) @ v
    return r @ torch.diag(m_c / torch.linalg.norm(r, dim=0))


@pytest.mark.parametrize("kind", list(KINDS))
def test_output_equals_base_at_init(kind):
    model, host, ad, plain, x = build(kind)
    w = w2d(kind, plain)
    assert torch.allclose(ad.bora_magnitude_row.detach().double(), torch.linalg.norm(w, dim=1), rtol=1e-6)
    assert torch.allclose(ad.bora_magnitude_col.detach().double(), torch.linalg.norm(w, dim=0), rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(ad.delta_weight(), torch.zeros_like(ad.delta_weight()))
        assert torch.equal(host(x), plain(x))  # exact: W' - W is exactly zero at init


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_matches_explicit_formula_and_column_norms_equal_m_c(kind):
    model, host, ad, plain, x = build(kind, init_lora_weights=False)
    randomize(ad)
    w = w2d(kind, plain)
    wp = explicit(ad, w)
    assert rel_err(ad.lora_B.double() @ ad.lora_A.double() * ad.scaling, w) > 0.1  # the update is not negligible
    with torch.no_grad():
        expected = x.double() @ wp.T + plain.bias.double()
        assert close(host(x), expected, 1e-5)
        assert rel_err(ad.adapted_weight(), wp) < 1e-5
        col = torch.linalg.norm(ad.adapted_weight().double(), dim=0)
    assert rel_err(col, ad.bora_magnitude_col.detach().double()) < 1e-5  # the last normalization holds exactly


def test_reduces_to_dora_when_m_c_equals_the_column_norms_of_r():
    model, host, ad, plain, x = build("linear", init_lora_weights=False)
    randomize(ad)
    with torch.no_grad():  # freeze m_c at ||R||_col: the column step is then the identity
        v = ad._base() + ad.scaling * ad.lora_B @ ad.lora_A
        r = v * (ad.bora_magnitude_row / torch.linalg.norm(v, dim=1))[:, None]
        ad.bora_magnitude_col.copy_(torch.linalg.norm(r, dim=0))
    dora_model = AdapterModel(copy.deepcopy(nn.Sequential(plain)))
    dora_model.add_adapter("default", LoraConfig(target_modules=["0"], r=3, lora_alpha=5, use_dora=True))
    dora = dora_model.model.get_submodule("0").adapters["default"]
    with torch.no_grad():
        dora.lora_A.copy_(ad.lora_A)
        dora.lora_B.copy_(ad.lora_B)
        dora.lora_magnitude_vector.copy_(ad.bora_magnitude_row)
        assert close(host(x), dora_model(x), 1e-5)
        ad.bora_magnitude_col.mul_(1.5)  # the check can tell: another m_c is not DoRA
        assert not close(host(x), dora_model(x), 1e-3)


def _twin(x, w, bias, leaves, s, detach: bool):
    """Hand-written BoRA on leaf copies, with the norms detached or left in the graph."""
    v = w + s * leaves["lora_B"] @ leaves["lora_A"]
    n_r = torch.linalg.norm(v, dim=1)
    r = v * (leaves["bora_magnitude_row"] / (n_r.detach() if detach else n_r))[:, None]
    n_c = torch.linalg.norm(r, dim=0)
    wp = r * (leaves["bora_magnitude_col"] / (n_c.detach() if detach else n_c))[None, :]
    return x @ wp.T + bias


def test_gradient_treats_both_norms_as_constants():
    model, host, ad, plain, x = build("linear", init_lora_weights=False)
    randomize(ad)
    g = torch.randn(5, 12)
    (host(x) * g).sum().backward()
    ours = {k: getattr(ad, k).grad.clone() for k in NAMES}

    def reference(detach: bool) -> dict[str, torch.Tensor]:
        leaves = {k: getattr(ad, k).detach().clone().requires_grad_(True) for k in NAMES}
        (_twin(x, plain.weight.detach(), plain.bias.detach(), leaves, ad.scaling, detach) * g).sum().backward()
        return {k: t.grad for k, t in leaves.items()}

    ref, attached = reference(detach=True), reference(detach=False)
    for k in NAMES:
        assert rel_err(ours[k], ref[k]) < 1e-5, k
    assert rel_err(ours["lora_A"], attached["lora_A"]) > 1e-3  # the check can tell detached from attached
    assert host.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    model, host, ad, plain, x = build(kind, init_lora_weights=False)
    randomize(ad)
    w0 = host.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = host(x).clone()
        assert not close(before, plain(x), 1e-3)
        model.merge()
        assert rel_err(w2d(kind, host.base_layer), explicit(ad, w2d(kind, plain))) < 1e-5
        assert close(host(x), before, 1e-5)
        model.unmerge()
        assert (host.base_layer.weight - w0).abs().max() <= 1e-6 * (1 + w0.abs().max())
        assert close(host(x), before, 1e-5)


def test_disk_keys_keep_peft_lora_names():
    model, host, ad, plain, x = build("linear")
    keys = set(adapter_state(model, "default"))
    prefix = "base_model.model.0."
    assert keys == {prefix + k for k in ("lora_A.weight", "lora_B.weight", "bora_magnitude_row",
                                         "bora_magnitude_col")}


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_bias", True), ("init_lora_weights", "pissa"),
                                          ("r", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        BoraConfig(target_modules=["0"], **{field: value})
    assert e.value.field == field


@pytest.mark.parametrize("layer", [nn.Embedding(10, 4), nn.Conv2d(3, 4, 3)])
def test_unsupported_layers_raise(layer):
    model = AdapterModel(nn.Sequential(layer))
    with pytest.raises(UnsupportedLayerError):
        model.add_adapter("default", BoraConfig(target_modules=["0"], r=2))


def test_method_and_peft_type():
    config = BoraConfig(target_modules=["0"])
    assert config.method == "bora" and config.peft_type == "BORA"
    assert config.for_original_base() is config
