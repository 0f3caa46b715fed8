"""SALT (spec 1.20): W' = U ReLU(S') V^T with scaled/shifted top values and a low-rank tail block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterModel, CheckpointError, ConfigError, UnsupportedLayerError
from peftkit.methods.salt import SaltConfig, salt_sizes
from peftkit.methods.svft import canonical_svd

from ._helpers import close, hosts, perturb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def salt_net(seed: int = 0, **kw) -> tuple[AdapterModel, nn.Module]:
    torch.manual_seed(seed)
    base = Net()
    model = AdapterModel(copy.deepcopy(base))
    model.add_adapter("default", SaltConfig(target_modules=["fc1", "fc2"], **{"r": 3, "ratio": 0.25, **kw}))
    return model, base


def x_in() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(4))


def w_prime_twin(w: torch.Tensor, ad) -> torch.Tensor:
    """U ReLU(S') V^T in fp64, S' built entry by entry from the spec."""
    u, s, vh = (t.double() for t in canonical_svd(w))
    k, t = s.numel(), ad.t
    xy = ad.salt_X.detach().double() @ ad.salt_Y.detach().double()
    sp = torch.zeros(k, k, dtype=torch.float64)
    for i in range(t):
        sp[i, i] = ad.salt_scale[i].item() * s[i] + ad.salt_shift[i].item()
    sp[t:, t:] = torch.diag(s[t:]) + xy
    return u @ torch.relu(sp) @ vh


def test_identity_at_init() -> None:
    model, base = salt_net()
    x = x_in()
    assert torch.equal(model(x), base(x))
    ad = hosts(model)["fc1"].adapters["default"]
    assert ad.core().abs().max() == 0 and ad.salt_X.abs().max() > 0 and ad.salt_Y.abs().max() == 0


def test_forward_equals_u_relu_s_prime_v() -> None:
    model, base = salt_net()
    perturb(model.named_parameters(), seed=2, scale=1.0)  # large enough that ReLU clips some entries
    x = x_in()
    ad = hosts(model)["fc1"].adapters["default"]
    w = base.fc1.weight.detach()
    w_new = w_prime_twin(w, ad)
    assert torch.allclose(ad.delta_weight().double(), w_new - w.double(), atol=1e-5)
    assert close(hosts(model)["fc1"](x), x.double() @ w_new.T + base.fc1.bias.double())
    xy = ad.salt_X.detach() @ ad.salt_Y.detach()
    assert (torch.diag(ad.salt_sigma[ad.t:]) + xy).min() < 0  # the ReLU was active in this check


def test_unit_scale_zero_shift_preserves_the_top_singular_triplets() -> None:
    model, base = salt_net()
    ad = hosts(model)["fc1"].adapters["default"]
    with torch.no_grad():
        ad.salt_Y.normal_()
    w = base.fc1.weight.detach()
    w_new = w.double() + ad.delta_weight().double()
    u, s, vh = (t.double() for t in canonical_svd(w))
    for i in range(ad.t):
        assert torch.allclose(w_new @ vh[i], s[i] * u[:, i], atol=1e-5)
        assert torch.allclose(u[:, i] @ w_new, s[i] * vh[i], atol=1e-5)


def test_sizes_clamp_to_tiny_layers() -> None:
    assert salt_sizes(8, 0.1, 256) == (1, 7)
    assert salt_sizes(100, 0.1, 8) == (10, 8)
    assert salt_sizes(4, 0.99, 2) == (3, 1)
    model, _ = salt_net(r=256, ratio=0.1)
    ad = hosts(model)["fc2"].adapters["default"]  # k = 6: t = 1, r_l = 5
    assert ad.salt_scale.shape == (1,) and ad.salt_X.shape == (5, 5) and ad.salt_Y.shape == (5, 5)


def test_regularizer_off_by_default_and_closed_form_when_on() -> None:
    model, _ = salt_net()
    assert model.extra_losses() == {}
    model, _ = salt_net(reg_multiplier=0.5)
    perturb(model.named_parameters(), seed=3)
    want = 0.0
    for ad in (h.adapters["default"] for h in hosts(model).values()):
        s = ad.salt_sigma[:ad.t].double()
        top = ad.salt_scale.detach().double() * s + ad.salt_shift.detach().double() - s
        xy = ad.salt_X.detach().double() @ ad.salt_Y.detach().double()
        want += 0.5 * (top.square().sum().sqrt() + xy.square().sum().sqrt())
    assert model.extra_losses()["salt_reg"].item() == pytest.approx(want.item(), rel=1e-5)


def test_save_load_onto_a_fresh_base_and_refuse_another_base(tmp_path) -> None:
    model, base = salt_net()
    perturb(model.named_parameters(), seed=5, scale=0.5)
    x = x_in()
    out = model(x).detach()
    peftkit.save_adapter(model, tmp_path)
    loaded = AdapterModel(copy.deepcopy(base))
    peftkit.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(x), out)
    torch.manual_seed(42)
    with pytest.raises(CheckpointError, match="singular values differ"):
        peftkit.load_adapter(AdapterModel(Net()), tmp_path)


def test_merge_unmerge_delete_restore_the_base() -> None:
    model, base = salt_net()
    perturb(model.named_parameters(), seed=6, scale=0.5)
    x = x_in()
    out = model(x)
    model.merge()
    assert close(model(x), out)
    model.unmerge()
    model.delete_adapter("default")
    assert close(model(x), base(x), rel=1e-6)


def test_only_scale_shift_and_factors_train() -> None:
    model, _ = salt_net()
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"salt_scale", "salt_shift", "salt_X", "salt_Y"}


def test_rank_one_layers_are_unsupported() -> None:
    with pytest.raises(UnsupportedLayerError):
        AdapterModel(nn.Sequential(nn.Linear(4, 1))).add_adapter("a", SaltConfig(target_modules=["0"]))


@pytest.mark.parametrize("kw,field", [({"r": 0}, "r"), ({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"),
                                      ({"reg_multiplier": -1.0}, "reg_multiplier"),
                                      ({"reg_multiplier": float("inf")}, "reg_multiplier")])
def test_bad_config_names_the_field(kw, field) -> None:
    with pytest.raises(ConfigError) as info:
        SaltConfig(**kw)
    assert info.value.field == field
